//! # train: small-scale training of recurrent-depth models
//!
//! Built on `model`'s steps. So far: the paper's randomized depth ([`depth`]), its Adam variant
//! ([`optim`]), learning-rate schedules ([`schedule`]), global-norm clipping ([`clip`]) and one
//! optimizer step with gradient accumulation ([`step`]); the reversed-digit addition task
//! ([`addition`]).
//! The truncated-backprop forward pass is `model::Huginn::forward_truncated`, checked against
//! the reference's gradients.

pub mod addition;
pub mod clip;
pub mod depth;
pub mod optim;
pub mod schedule;
pub mod step;
