//! State that hook functions share with each other and keep across passes.

use std::any::Any;
use std::collections::BTreeMap;

/// A typed key-value store shared by all hook functions of a [`FlexModel`](crate::FlexModel)
/// and kept across passes (FlexModel's `save_ctx`).
///
/// ```
/// let mut save = flexmodel::SaveContext::default();
/// *save.get_or_insert_with("calls", || 0usize) += 1;
/// assert_eq!(save.get::<usize>("calls"), Some(&1));
/// assert_eq!(save.get::<f32>("calls"), None); // another type
/// ```
#[derive(Default)]
pub struct SaveContext {
    values: BTreeMap<String, Box<dyn Any + Send>>,
}

impl SaveContext {
    /// Stores `value` under `key`, replacing what was there.
    pub fn insert<T: Any + Send>(&mut self, key: impl Into<String>, value: T) {
        self.values.insert(key.into(), Box::new(value));
    }

    /// The value under `key` if there is one of type `T`.
    pub fn get<T: Any>(&self, key: &str) -> Option<&T> {
        self.values.get(key)?.downcast_ref()
    }

    /// The value under `key`, mutably, if there is one of type `T`.
    pub fn get_mut<T: Any>(&mut self, key: &str) -> Option<&mut T> {
        self.values.get_mut(key)?.downcast_mut()
    }

    /// The value under `key`, first storing `init()` there unless a `T` is already there.
    pub fn get_or_insert_with<T: Any + Send>(
        &mut self,
        key: &str,
        init: impl FnOnce() -> T,
    ) -> &mut T {
        if self.get::<T>(key).is_none() {
            self.insert(key, init());
        }
        self.values
            .get_mut(key)
            .and_then(|v| v.downcast_mut())
            .expect("a value of type T was just stored under this key")
    }

    /// Removes and returns the value under `key` if it has type `T`.
    pub fn remove<T: Any>(&mut self, key: &str) -> Option<T> {
        self.get::<T>(key)?;
        self.values.remove(key)?.downcast().ok().map(|b| *b)
    }

    /// The keys, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.values.keys().map(String::as_str)
    }
}

impl std::fmt::Debug for SaveContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.keys()).finish()
    }
}
