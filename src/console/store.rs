//! Console sessions in memory, bounded: expired sessions are dropped as new ones are
//! created, and past [`MAX_SESSIONS`] the ones closest to expiry go first, so a flood of
//! anonymous visits to the sign-in page cannot grow memory without limit. Sessions do not
//! survive a restart (signing in again is cheap; approvals and audit are durable).

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;
use time::OffsetDateTime;
use tower_sessions::SessionStore;
use tower_sessions::session::{Id, Record};
use tower_sessions::session_store::Result;

/// Most sessions held at once.
pub const MAX_SESSIONS: usize = 10_000;

#[derive(Debug, Clone)]
pub struct BoundedStore {
    sessions: Arc<Mutex<HashMap<Id, Record>>>,
    capacity: usize,
}

impl Default for BoundedStore {
    fn default() -> Self {
        Self::with_capacity(MAX_SESSIONS)
    }
}

impl BoundedStore {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            sessions: Arc::default(),
            capacity: capacity.max(1),
        }
    }

    fn make_room(&self, map: &mut HashMap<Id, Record>) {
        let now = OffsetDateTime::now_utc();
        map.retain(|_, r| r.expiry_date > now);
        while map.len() >= self.capacity {
            let Some(oldest) = map
                .iter()
                .min_by_key(|(_, r)| r.expiry_date)
                .map(|(id, _)| *id)
            else {
                break;
            };
            map.remove(&oldest);
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.sessions.lock().len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl SessionStore for BoundedStore {
    async fn create(&self, record: &mut Record) -> Result<()> {
        let mut map = self.sessions.lock();
        self.make_room(&mut map);
        while map.contains_key(&record.id) {
            record.id = Id::default();
        }
        map.insert(record.id, record.clone());
        Ok(())
    }

    async fn save(&self, record: &Record) -> Result<()> {
        let mut map = self.sessions.lock();
        if !map.contains_key(&record.id) {
            self.make_room(&mut map);
        }
        map.insert(record.id, record.clone());
        Ok(())
    }

    async fn load(&self, id: &Id) -> Result<Option<Record>> {
        let now = OffsetDateTime::now_utc();
        Ok(self
            .sessions
            .lock()
            .get(id)
            .filter(|r| r.expiry_date > now)
            .cloned())
    }

    async fn delete(&self, id: &Id) -> Result<()> {
        self.sessions.lock().remove(id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(minutes: i64) -> Record {
        Record {
            id: Id::default(),
            data: Default::default(),
            expiry_date: OffsetDateTime::now_utc() + time::Duration::minutes(minutes),
        }
    }

    #[tokio::test]
    async fn expired_sessions_do_not_load_and_are_dropped() {
        let store = BoundedStore::default();
        let mut old = record(-1);
        store.create(&mut old).await.unwrap();
        assert!(store.load(&old.id).await.unwrap().is_none());
        let mut new = record(10);
        store.create(&mut new).await.unwrap();
        assert_eq!(store.len(), 1, "the expired one made room");
        assert!(store.load(&new.id).await.unwrap().is_some());
        store.delete(&new.id).await.unwrap();
        assert!(store.is_empty());
    }

    #[tokio::test]
    async fn never_holds_more_than_the_bound() {
        let store = BoundedStore::with_capacity(100);
        let mut keep = record(600);
        store.create(&mut keep).await.unwrap();
        for i in 0..105 {
            store.create(&mut record(1 + i % 5)).await.unwrap();
        }
        assert_eq!(store.len(), 100);
        assert!(
            store.load(&keep.id).await.unwrap().is_some(),
            "the longest-lived session stays"
        );
    }
}
