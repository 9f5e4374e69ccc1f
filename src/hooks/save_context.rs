//! State that hook functions share with each other and keep across passes.

use std::any::{Any, type_name};
use std::collections::BTreeMap;

use crate::{Error, Result};

/// A value and the name of its type.
struct Entry {
    value: Box<dyn Any + Send>,
    type_name: &'static str,
}

/// A typed key-value store shared by all hook functions of a [`FlexModel`](crate::FlexModel)
/// and kept across passes (FlexModel's `save_ctx`).
///
/// Reading a key as another type than the one stored under it is an error, never a
/// silent `None` or an overwrite: two hooks that disagree about a key find out.
///
/// ```
/// let mut save = flexmodel::SaveContext::default();
/// *save.get_or_insert_with("calls", || 0usize)? += 1;
/// assert_eq!(save.get::<usize>("calls")?, Some(&1));
/// assert!(save.get::<f32>("calls").is_err()); // another type
/// assert_eq!(save.get::<f32>("missing")?, None);
/// # Ok::<(), flexmodel::Error>(())
/// ```
#[derive(Default)]
pub struct SaveContext {
    values: BTreeMap<String, Entry>,
}

impl SaveContext {
    /// Stores `value` under `key`, replacing what was there (of any type).
    pub fn insert<T: Any + Send>(&mut self, key: impl Into<String>, value: T) {
        let entry = Entry {
            value: Box::new(value),
            type_name: type_name::<T>(),
        };
        self.values.insert(key.into(), entry);
    }

    /// The value under `key`, if there is one; an error if it is not a `T`.
    pub fn get<T: Any>(&self, key: &str) -> Result<Option<&T>> {
        let Some(entry) = self.values.get(key) else {
            return Ok(None);
        };
        match entry.value.downcast_ref() {
            Some(value) => Ok(Some(value)),
            None => Err(mismatch::<T>(key, entry.type_name)),
        }
    }

    /// The value under `key`, mutably, if there is one; an error if it is not a `T`.
    pub fn get_mut<T: Any>(&mut self, key: &str) -> Result<Option<&mut T>> {
        let Some(entry) = self.values.get_mut(key) else {
            return Ok(None);
        };
        let stored = entry.type_name;
        match entry.value.downcast_mut() {
            Some(value) => Ok(Some(value)),
            None => Err(mismatch::<T>(key, stored)),
        }
    }

    /// The value under `key`, first storing `init()` there if the key is free; an error
    /// if a value of another type is stored under it.
    pub fn get_or_insert_with<T: Any + Send>(
        &mut self,
        key: &str,
        init: impl FnOnce() -> T,
    ) -> Result<&mut T> {
        if !self.values.contains_key(key) {
            self.insert(key, init());
        }
        self.get_mut(key)?.ok_or(Error::Internal(
            "a value just stored in the save context is gone",
        ))
    }

    /// Removes and returns the value under `key`, if there is one; an error (and the
    /// value stays) if it is not a `T`.
    pub fn remove<T: Any>(&mut self, key: &str) -> Result<Option<T>> {
        if self.get::<T>(key)?.is_none() {
            return Ok(None);
        }
        let entry = self.values.remove(key);
        Ok(entry.and_then(|e| e.value.downcast().ok()).map(|b| *b))
    }

    /// The keys, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.values.keys().map(String::as_str)
    }
}

/// The error of reading `key`, which holds a `stored`, as a `T`.
fn mismatch<T>(key: &str, stored: &'static str) -> Error {
    Error::SaveContextType {
        key: key.to_string(),
        stored,
        requested: type_name::<T>(),
    }
}

impl std::fmt::Debug for SaveContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.keys()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_read_as_another_type_is_an_error_and_stays() {
        let mut save = SaveContext::default();
        save.insert("calls", 3usize);
        let err = save.get_or_insert_with("calls", || 0.5f32).unwrap_err();
        assert_eq!(
            err.to_string(),
            "save context: \"calls\" holds a usize, not a f32"
        );
        assert!(matches!(err, Error::SaveContextType { .. }));
        assert!(save.remove::<String>("calls").is_err());
        assert!(save.get_mut::<i64>("calls").is_err());
        assert_eq!(save.remove::<usize>("calls").unwrap(), Some(3));
        assert_eq!(save.get::<usize>("calls").unwrap(), None);
    }
}
