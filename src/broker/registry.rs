//! Which durable consumers exist, by namespace and by owner, and the limits on how many
//! there may be.
//!
//! A consumer exists from its creation until it is deleted, whether its dispatcher runs
//! or not (an idle consumer is only its stored progress). The broker fills the registry
//! once at start-up from the stored consumers (off the async workers) and keeps it up to
//! date on every creation and deletion, so that checking a limit never reads a
//! directory. Creating is one step under one lock: two creations at once cannot both
//! pass a limit that has room for one.
//!
//! It holds names and owners, not progress: a few dozen bytes per consumer.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::store::{ConsumerName, Owner};

/// Why a consumer cannot be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The namespace has its limit of consumers.
    Namespace { limit: usize },
    /// The owner has its limit of consumers (across namespaces).
    Owner { limit: usize },
}

pub struct Registry {
    max_per_namespace: usize,
    max_per_owner: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Consumers by namespace, with their owners.
    namespaces: HashMap<String, HashMap<ConsumerName, Option<Owner>>>,
    /// Consumers per owner.
    owners: HashMap<Owner, usize>,
}

impl Inner {
    fn count_owner(&mut self, owner: &Option<Owner>) {
        if let Some(owner) = owner {
            *self.owners.entry(owner.clone()).or_default() += 1;
        }
    }

    fn uncount_owner(&mut self, owner: &Option<Owner>) {
        let Some(owner) = owner else {
            return;
        };
        if let Some(count) = self.owners.get_mut(owner) {
            *count -= 1;
            if *count == 0 {
                self.owners.remove(owner);
            }
        }
    }
}

impl Registry {
    /// At most `max_per_namespace` consumers per namespace and `max_per_owner` per owner.
    pub fn new(max_per_namespace: usize, max_per_owner: usize) -> Registry {
        Registry {
            max_per_namespace,
            max_per_owner,
            inner: Mutex::default(),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a consumer as it is stored, whatever the limits (they may have been lowered
    /// since it was created): at start-up, and when a stored consumer starts (an owner
    /// it gained, by the first token that attached once requests are authenticated,
    /// counts for that owner).
    pub fn insert(&self, namespace: &str, name: ConsumerName, owner: Option<Owner>) {
        let mut inner = self.inner();
        inner.count_owner(&owner);
        let previous = inner
            .namespaces
            .entry(namespace.to_owned())
            .or_default()
            .insert(name, owner);
        inner.uncount_owner(&previous.flatten());
    }

    /// Counts a new consumer if the limits leave room for it (an owner's limit applies
    /// when requests are authenticated, that is when there is an owner). A consumer that
    /// exists already is left as it is.
    pub fn create(
        &self,
        namespace: &str,
        name: &ConsumerName,
        owner: Option<&Owner>,
    ) -> Result<(), Refusal> {
        let mut inner = self.inner();
        let consumers = inner.namespaces.get(namespace);
        if consumers.is_some_and(|c| c.contains_key(name)) {
            return Ok(());
        }
        if consumers.map_or(0, HashMap::len) >= self.max_per_namespace {
            return Err(Refusal::Namespace {
                limit: self.max_per_namespace,
            });
        }
        if let Some(owner) = owner {
            if inner.owners.get(owner).copied().unwrap_or(0) >= self.max_per_owner {
                return Err(Refusal::Owner {
                    limit: self.max_per_owner,
                });
            }
        }
        let owner = owner.cloned();
        inner.count_owner(&owner);
        inner
            .namespaces
            .entry(namespace.to_owned())
            .or_default()
            .insert(name.clone(), owner);
        Ok(())
    }

    /// The consumer no longer exists; whether it was counted.
    pub fn remove(&self, namespace: &str, name: &ConsumerName) -> bool {
        let mut inner = self.inner();
        let Some(consumers) = inner.namespaces.get_mut(namespace) else {
            return false;
        };
        let removed = consumers.remove(name);
        if consumers.is_empty() {
            inner.namespaces.remove(namespace);
        }
        match removed {
            Some(owner) => {
                inner.uncount_owner(&owner);
                true
            }
            None => false,
        }
    }

    /// Consumers of `namespace`.
    #[cfg(test)]
    pub fn count(&self, namespace: &str) -> usize {
        self.inner()
            .namespaces
            .get(namespace)
            .map_or(0, HashMap::len)
    }

    /// Consumers that `owner` owns.
    #[cfg(test)]
    pub fn owned_by(&self, owner: &Owner) -> usize {
        self.inner().owners.get(owner).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> ConsumerName {
        ConsumerName::parse(text).expect("name")
    }

    #[test]
    fn limits_count_per_namespace_and_per_owner_and_deleting_makes_room() {
        let registry = Registry::new(3, 2);
        let (ana, bob) = (Owner("ana".into()), Owner("bob".into()));
        registry.insert("orders", name("stored"), None);
        registry.create("orders", &name("a1"), Some(&ana)).unwrap();
        registry.create("billing", &name("a2"), Some(&ana)).unwrap();
        // Counted across namespaces.
        assert_eq!(
            registry.create("orders", &name("a3"), Some(&ana)),
            Err(Refusal::Owner { limit: 2 })
        );
        // Creating what exists is not a creation.
        registry.create("orders", &name("a1"), Some(&ana)).unwrap();
        registry.create("orders", &name("b1"), Some(&bob)).unwrap();
        assert_eq!(registry.count("orders"), 3);
        assert_eq!(
            registry.create("orders", &name("b2"), Some(&bob)),
            Err(Refusal::Namespace { limit: 3 })
        );
        assert_eq!(
            registry.create("orders", &name("open"), None),
            Err(Refusal::Namespace { limit: 3 })
        );
        registry.remove("orders", &name("a1"));
        assert_eq!(registry.owned_by(&ana), 1);
        registry.create("orders", &name("a3"), Some(&ana)).unwrap();
        // An unowned consumer adopted by bob counts for bob.
        registry.insert("orders", name("stored"), Some(bob.clone()));
        assert_eq!(registry.owned_by(&bob), 2);
        registry.remove("orders", &name("stored"));
        assert_eq!(registry.owned_by(&bob), 1);
        assert_eq!(registry.count("orders"), 2);
    }
}
