//! # folder: a model folder, as training and inference both open it
//!
//! A Hugging Face model folder holds the weights and the files that make the model a text
//! model: the tokenizer, its special tokens, the chat template and the generation defaults.
//! Read [`ModelFolder`] first (what opening a folder gives), then [`chat`] (the template and
//! the messages it renders), [`hub`] (`ORG/NAME[@REVISION]` resolved to a local folder) and
//! [`generation_config`]. The weights themselves are `model`'s (`Huginn::from_pretrained`).

pub mod chat;
pub mod generation_config;
pub mod hub;
mod model_folder;

pub use model_folder::{
    CHAT_TEMPLATE_FILE, FolderError, GENERATION_CONFIG_FILE, ModelFolder, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE,
    TextFiles,
};
