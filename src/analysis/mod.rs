//! Interpretability analyses built on the hook API.

pub mod induction;
pub mod lens;
pub mod patching;
