//! Empty on purpose: this crate only adds features to shared dependencies (see its manifest).
