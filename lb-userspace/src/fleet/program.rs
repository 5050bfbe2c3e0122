//! The fleet's backends in the one table: what the view wants, added, drained, activated and
//! removed through the table's own calls, like any backend the API adds. Only backends added
//! here are touched here.

use std::collections::{BTreeMap, BTreeSet};

use tracing::{info, warn};

use super::view::{BackendKey, Wanted};
use crate::spec::Weight;
use crate::table::{NewBackend, TableError, TableHandle};

/// The table's backends that came from the fleet.
#[derive(Debug, Default)]
pub(super) struct Programmed {
    /// Backend id and whether it is drained, by service and address.
    backends: BTreeMap<BackendKey, (u32, bool)>,
    /// Wanted backends the table refused (an address configured by hand, a full service): warned
    /// once, tried again when the fleet changes.
    refused: BTreeSet<BackendKey>,
}

impl Programmed {
    pub fn len(&self) -> usize {
        self.backends.len()
    }

    /// Makes the table's fleet backends what `wanted` says; what the table refuses is warned
    /// about and tried again at the next change.
    pub async fn apply(&mut self, table: &TableHandle, wanted: &BTreeMap<BackendKey, Wanted>) {
        let gone: Vec<BackendKey> = self
            .backends
            .keys()
            .filter(|key| !wanted.contains_key(*key))
            .cloned()
            .collect();
        for key in gone {
            let Some(&(id, _)) = self.backends.get(&key) else {
                continue;
            };
            // Forgotten only once the table has let it go: a failed removal is tried again at
            // the next change.
            match table.remove_backend(id).await {
                Ok(_) | Err(TableError::UnknownBackend(_)) => {
                    self.backends.remove(&key);
                    info!(service = %key.0, address = %key.1, id, "fleet backend gone")
                }
                Err(error) => {
                    warn!(service = %key.0, address = %key.1, id, %error, "removing a fleet backend");
                }
            }
        }
        self.refused.retain(|key| wanted.contains_key(key));
        for (key, want) in wanted {
            let known = self.backends.contains_key(key);
            let result = match self.backends.get(key).copied() {
                Some((_, draining)) if draining == want.draining => continue,
                Some((id, _)) if want.draining => table.drain_backend(id).await.map(|_| id),
                Some((id, _)) => table.activate_backend(id).await.map(|_| id),
                None => self.add(table, key, want).await.inspect(|&id| {
                    // Recorded as added (and active) at once: a drain that fails below is tried
                    // again at the next change, and the backend is never left untracked.
                    self.backends.insert(key.clone(), (id, false));
                }),
            };
            let result = match (result, want.draining) {
                (Ok(id), true) if self.backends.get(key) == Some(&(id, false)) => {
                    table.drain_backend(id).await.map(|_| id)
                }
                (result, _) => result,
            };
            match result {
                Ok(id) => {
                    if known {
                        let state = if want.draining { "draining" } else { "active" };
                        info!(service = %key.0, address = %key.1, id, state, "fleet backend state");
                    }
                    self.backends.insert(key.clone(), (id, want.draining));
                }
                Err(error) => {
                    if self.refused.insert(key.clone()) {
                        warn!(
                            service = %key.0,
                            address = %key.1,
                            host = %want.host,
                            instance = %want.instance,
                            %error,
                            "the fleet's backend is not taken"
                        );
                    }
                }
            }
        }
    }

    async fn add(
        &self,
        table: &TableHandle,
        key: &BackendKey,
        want: &Wanted,
    ) -> Result<u32, TableError> {
        let info = table
            .add_backend(NewBackend {
                service: key.0.clone(),
                address: key.1,
                weight: Weight::ONE,
                max_connections: 0,
                models: want.models.clone(),
                instance: None,
            })
            .await?;
        info!(
            service = %key.0,
            address = %key.1,
            id = info.id,
            host = %want.host,
            instance = %want.instance,
            "fleet backend added"
        );
        Ok(info.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeDataplane;
    use crate::table::BackendState;

    fn wanted(entries: &[(&str, bool)]) -> BTreeMap<BackendKey, Wanted> {
        entries
            .iter()
            .map(|&(address, draining)| {
                (
                    ("chat".to_owned(), address.parse().expect("address")),
                    Wanted {
                        host: "b".into(),
                        instance: "x".into(),
                        draining,
                        models: vec!["m".into()],
                    },
                )
            })
            .collect()
    }

    /// Added, drained, activated and removed as the view says; a configured backend at the same
    /// address is left alone and the refusal is counted.
    #[tokio::test]
    async fn the_table_follows_the_fleet_and_keeps_its_own_backends() {
        let dataplane = FakeDataplane::default();
        let configured = crate::spec::BackendSpec {
            address: "10.0.1.2:8080".parse().expect("address"),
            weight: Weight::ONE,
            max_connections: 0,
            models: Vec::new(),
        };
        let service = crate::fake::chat_service(vec![configured], None);
        let (table, task) = crate::table::start(dataplane.clone(), &[service]).expect("table");
        let mut programmed = Programmed::default();
        let listed = |table: &TableHandle| {
            let snapshot = table.snapshot().expect("snapshot");
            snapshot
                .backends
                .iter()
                .map(|b| (b.address.to_string(), b.state))
                .collect::<Vec<_>>()
        };

        programmed
            .apply(
                &table,
                &wanted(&[("10.0.2.1:8080", false), ("10.0.1.2:8080", false)]),
            )
            .await;
        assert_eq!(
            listed(&table),
            [
                ("10.0.1.2:8080".to_owned(), BackendState::Active),
                ("10.0.2.1:8080".to_owned(), BackendState::Active)
            ]
        );
        programmed
            .apply(&table, &wanted(&[("10.0.2.1:8080", true)]))
            .await;
        assert_eq!(
            listed(&table)[1],
            ("10.0.2.1:8080".to_owned(), BackendState::Draining)
        );
        programmed
            .apply(&table, &wanted(&[("10.0.2.1:8080", false)]))
            .await;
        assert_eq!(
            listed(&table)[1],
            ("10.0.2.1:8080".to_owned(), BackendState::Active)
        );
        programmed.apply(&table, &wanted(&[])).await;
        assert_eq!(
            listed(&table),
            [("10.0.1.2:8080".to_owned(), BackendState::Active)]
        );
        assert_eq!(programmed.len(), 0);
        table.close().await;
        task.await.expect("table task");
    }
}
