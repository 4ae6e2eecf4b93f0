//! # train: small-scale training of recurrent-depth models
//!
//! Built on `model`'s steps. So far: the paper's randomized depth ([`depth`]).

pub mod depth;
