//! `EffectsCache`: a small bounded memo of [`session_effects`] by statement text.
//!
//! Clients repeat the same few texts (an ORM's `SET search_path ...`, a driver's
//! `SET application_name ...`), and texts that pass the prefilter without having an
//! effect (`UPDATE t SET ...`) would otherwise be parsed on every execution. The cache
//! is deliberately simple: a `HashMap` behind a `Mutex` that is cleared when full, so
//! its memory is bounded by `capacity` texts of at most [`EffectsCache::TEXT_BYTES_MAX`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::session_effect::{may_have_session_effects, session_effects, SessionEffect};

/// Session effects by statement text, at most `capacity` entries.
#[derive(Debug)]
pub struct EffectsCache {
    entries_max: usize,
    entries: Mutex<HashMap<String, Arc<[SessionEffect]>>>,
    /// Shared result for texts without effects, so they cost no allocation.
    none: Arc<[SessionEffect]>,
}

impl EffectsCache {
    /// Longer texts are parsed every time rather than cached: they are rarely repeated
    /// session statements, and they would dominate the cache's memory.
    pub const TEXT_BYTES_MAX: usize = 8 * 1024;

    /// A cache of at most `entries_max` texts; 0 disables caching.
    pub fn new(entries_max: usize) -> Self {
        Self {
            entries_max,
            entries: Mutex::new(HashMap::with_capacity(entries_max.min(1024))),
            none: Arc::from([]),
        }
    }

    /// The session effects of `sql`, from the cache or parsed (see [`session_effects`];
    /// a text that does not parse has none). Texts rejected by
    /// [`may_have_session_effects`] return at once and are not stored.
    ///
    /// The lock is not held while parsing, so two threads may parse the same new text;
    /// both get the same answer.
    pub fn get_or_parse(&self, sql: &str) -> Arc<[SessionEffect]> {
        if !may_have_session_effects(sql.as_bytes()) {
            return Arc::clone(&self.none);
        }
        let cacheable = self.entries_max > 0 && sql.len() <= Self::TEXT_BYTES_MAX;
        if cacheable {
            if let Some(effects) = self.lock().get(sql) {
                return Arc::clone(effects);
            }
        }
        let effects = session_effects(sql);
        let effects = if effects.iter().all(|e| *e == SessionEffect::Unchanged) {
            Arc::clone(&self.none)
        } else {
            Arc::from(effects)
        };
        if cacheable {
            let mut entries = self.lock();
            if entries.len() >= self.entries_max {
                entries.clear();
            }
            entries.insert(sql.to_owned(), Arc::clone(&effects));
        }
        effects
    }

    /// Number of cached texts.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no text is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The map stays consistent even if a holder panicked (every critical section is a
    /// single map operation), so a poisoned lock is used as is.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<[SessionEffect]>>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caches_parsed_texts_and_returns_their_effects() {
        // Arrange
        let cache = EffectsCache::new(4);
        let sql = "SET search_path TO a, b";

        // Act
        let first = cache.get_or_parse(sql);
        let second = cache.get_or_parse(sql);

        // Check
        assert_eq!(&*first, session_effects(sql).as_slice());
        assert!(Arc::ptr_eq(&first, &second), "second lookup is a cache hit");
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn skips_texts_the_prefilter_rejects_or_too_long() {
        let cache = EffectsCache::new(4);
        let long = format!(
            "SET application_name = '{}'",
            "x".repeat(EffectsCache::TEXT_BYTES_MAX)
        );

        assert!(cache.get_or_parse("SELECT 1").is_empty());
        assert_eq!(
            cache.get_or_parse(&long).len(),
            1,
            "long text is still parsed"
        );
        assert!(cache.is_empty());
    }

    #[test]
    fn caches_texts_without_effects_that_pass_the_prefilter() {
        let cache = EffectsCache::new(4);

        assert!(cache.get_or_parse("SELECT 'a; SET b'").is_empty());
        assert!(cache.get_or_parse("SELEC 1; SET a.b = 1").is_empty());
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn clears_when_full_and_never_exceeds_capacity() {
        let cache = EffectsCache::new(3);

        for i in 0..10 {
            let sql = format!("SET a.b = {i}");
            let effects = cache.get_or_parse(&sql);
            assert_eq!(&*effects, session_effects(&sql).as_slice());
            assert!(cache.len() <= 3, "len {} after {i}", cache.len());
        }
        assert_eq!(cache.len(), 10 % 3);
    }

    #[test]
    fn capacity_zero_disables_caching() {
        let cache = EffectsCache::new(0);

        assert_eq!(cache.get_or_parse("RESET ALL").len(), 1);
        assert!(cache.is_empty());
    }
}
