//! A small ordered set of sessions: a key's candidates.

use crate::SessionId;
use serde::{Deserialize, Deserializer, Serialize};

/// The sessions that registered a key, in id order, without repeats. A sorted vector: a key
/// has a few candidates (the nodes that run it), and a `BTreeSet` spends a 100-byte node on
/// each key for them. Encodes as a sequence, as a `BTreeSet` does; decoding sorts and drops
/// repeats, so a hand-made snapshot cannot break the order lookups rely on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct SessionSet(Vec<SessionId>);

impl SessionSet {
    /// An empty set.
    pub fn new() -> SessionSet {
        SessionSet(Vec::new())
    }

    /// Adds `id`; false if it was there.
    pub fn insert(&mut self, id: SessionId) -> bool {
        match self.0.binary_search(&id) {
            Ok(_) => false,
            Err(at) => {
                self.0.insert(at, id);
                true
            }
        }
    }

    /// Removes `id`; false if it was not there.
    pub fn remove(&mut self, id: &SessionId) -> bool {
        match self.0.binary_search(id) {
            Ok(at) => {
                self.0.remove(at);
                true
            }
            Err(_) => false,
        }
    }

    /// Whether `id` is in the set.
    pub fn contains(&self, id: &SessionId) -> bool {
        self.0.binary_search(id).is_ok()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many sessions it holds.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The sessions in id order.
    pub fn iter(&self) -> std::slice::Iter<'_, SessionId> {
        self.0.iter()
    }
}

impl<'a> IntoIterator for &'a SessionSet {
    type Item = &'a SessionId;
    type IntoIter = std::slice::Iter<'a, SessionId>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl FromIterator<SessionId> for SessionSet {
    fn from_iter<I: IntoIterator<Item = SessionId>>(ids: I) -> SessionSet {
        let mut v: Vec<SessionId> = ids.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        SessionSet(v)
    }
}

impl<'de> Deserialize<'de> for SessionSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<SessionSet, D::Error> {
        Ok(Vec::<SessionId>::deserialize(d)?.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_without_repeats_and_decodes_like_a_btree_set() {
        let mut s = SessionSet::new();
        assert!(s.insert(SessionId(3)) && s.insert(SessionId(1)) && !s.insert(SessionId(3)));
        assert_eq!(s.iter().copied().collect::<Vec<_>>(), [SessionId(1), SessionId(3)]);
        assert!(s.contains(&SessionId(1)) && !s.contains(&SessionId(2)));
        assert!(s.remove(&SessionId(1)) && !s.remove(&SessionId(1)));
        let b: std::collections::BTreeSet<SessionId> = [SessionId(9), SessionId(4)].into();
        let from_btree: SessionSet =
            crate::codec::decode(&crate::codec::encode(&b).unwrap()).unwrap();
        assert_eq!(from_btree, [SessionId(4), SessionId(9)].into_iter().collect());
        assert_eq!(crate::codec::encode(&from_btree).unwrap(), crate::codec::encode(&b).unwrap());
        let unsorted: SessionSet =
            crate::codec::decode(&crate::codec::encode(&vec![5u64, 2, 5]).unwrap()).unwrap();
        assert_eq!(unsorted.iter().copied().collect::<Vec<_>>(), [SessionId(2), SessionId(5)]);
    }
}
