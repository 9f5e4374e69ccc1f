//! Interpretability analyses built on the hook API.

pub mod induction;
