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

#[derive(Debug, Clone, Default)]
pub struct BoundedStore(Arc<Mutex<HashMap<Id, Record>>>);

impl BoundedStore {
    fn make_room(map: &mut HashMap<Id, Record>) {
        let now = OffsetDateTime::now_utc();
        map.retain(|_, r| r.expiry_date > now);
        while map.len() >= MAX_SESSIONS {
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
        self.0.lock().len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl SessionStore for BoundedStore {
    async fn create(&self, record: &mut Record) -> Result<()> {
        let mut map = self.0.lock();
        Self::make_room(&mut map);
        while map.contains_key(&record.id) {
            record.id = Id::default();
        }
        map.insert(record.id, record.clone());
        Ok(())
    }

    async fn save(&self, record: &Record) -> Result<()> {
        let mut map = self.0.lock();
        if !map.contains_key(&record.id) {
            Self::make_room(&mut map);
        }
        map.insert(record.id, record.clone());
        Ok(())
    }

    async fn load(&self, id: &Id) -> Result<Option<Record>> {
        let now = OffsetDateTime::now_utc();
        Ok(self
            .0
            .lock()
            .get(id)
            .filter(|r| r.expiry_date > now)
            .cloned())
    }

    async fn delete(&self, id: &Id) -> Result<()> {
        self.0.lock().remove(id);
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
        let store = BoundedStore::default();
        let mut keep = record(600);
        store.create(&mut keep).await.unwrap();
        for i in 0..MAX_SESSIONS + 5 {
            store.create(&mut record(1 + i as i64 % 5)).await.unwrap();
        }
        assert_eq!(store.len(), MAX_SESSIONS);
        assert!(
            store.load(&keep.id).await.unwrap().is_some(),
            "the longest-lived session stays"
        );
    }
}
