//! # train: small-scale training of recurrent-depth models
//!
//! Built on `model`'s steps. So far: the paper's randomized depth ([`depth`]) and its Adam variant ([`optim`]); the
//! truncated-backprop forward pass is `model::Huginn::forward_truncated`.

pub mod depth;
pub mod optim;
