//! Where market snapshots live: the KV bucket `<prefix>_snapshots` holds, per market, either
//! the snapshot itself (up to `INLINE_MAX` bytes) or a pointer to an object of the object store
//! bucket of the same name (larger books).
//!
//! The bytes are opaque here (the market actor encodes them); what this module adds is the
//! envelope saying which stream sequence and epoch they cover, and a write that never leaves a
//! pointer to a missing object: the object is written first, the pointer is switched by
//! compare-and-set, and only then is the object the old pointer named deleted. A writer that
//! loses the compare-and-set deletes its own object and reports the conflict. This module must
//! never decode a snapshot, nor delete an object that a current pointer names.

use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use super::error::BusError;
use super::streams::StreamSettings;
use super::subjects::Subjects;

/// Largest snapshot kept in the KV value itself (NATS' default payload limit is 1 MiB).
pub const INLINE_MAX: usize = 768 * 1024;

/// A stored snapshot: the bytes and the sequence they cover.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotBlob {
    /// The last stream sequence the snapshot covers.
    pub last_seq: u64,
    /// The placement epoch of the owner that wrote it.
    pub epoch: u64,
    /// The encoded snapshot (its format is the writer's: see `encoding`).
    pub bytes: Vec<u8>,
    /// How `bytes` is encoded, e.g. `msgpack+gzip`.
    pub encoding: String,
}

/// Where a saved snapshot went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placed {
    Inline,
    Object(String),
}

/// The KV value: the snapshot inline, or the name of the object holding it.
#[derive(Serialize, Deserialize)]
struct Envelope {
    market: String,
    last_seq: u64,
    epoch: u64,
    encoding: String,
    size: u64,
    #[serde(with = "bin", default)]
    inline: Vec<u8>,
    #[serde(default)]
    object: Option<String>,
}

/// MessagePack `bin` for a byte vector (serde's default would write an array of integers).
mod bin {
    use serde::de::{Deserializer, SeqAccess, Visitor};
    use serde::ser::Serializer;

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Bytes;
        impl<'de> Visitor<'de> for Bytes {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = seq.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_byte_buf(Bytes)
    }
}

/// The snapshot stores of one prefix.
#[derive(Clone)]
pub struct SnapshotStore {
    kv: kv::Store,
    objects: object_store::ObjectStore,
    bucket: String,
}

fn failed(bucket: &str, reason: impl std::fmt::Display) -> BusError {
    BusError::Snapshot {
        bucket: bucket.to_string(),
        reason: reason.to_string(),
    }
}

impl SnapshotStore {
    /// Opens (creating when missing) the KV bucket and the object store.
    pub async fn open(
        js: &jetstream::Context,
        subjects: &Subjects,
        settings: &StreamSettings,
    ) -> Result<SnapshotStore, BusError> {
        let bucket = subjects.bucket("snapshots");
        let storage = if settings.memory {
            jetstream::stream::StorageType::Memory
        } else {
            jetstream::stream::StorageType::File
        };
        // Nodes starting together race to create these: a create that fails because another
        // node created the bucket meanwhile is followed by a second read.
        let kv = match js.get_key_value(bucket.clone()).await {
            Ok(kv) => kv,
            Err(_) => match js
                .create_key_value(kv::Config {
                    bucket: bucket.clone(),
                    history: 1,
                    storage,
                    num_replicas: settings.replicas,
                    max_value_size: i32::try_from(INLINE_MAX + 64 * 1024).unwrap_or(i32::MAX),
                    ..Default::default()
                })
                .await
            {
                Ok(kv) => kv,
                Err(e) => js
                    .get_key_value(bucket.clone())
                    .await
                    .map_err(|_| BusError::Bucket {
                        bucket: bucket.clone(),
                        reason: e.to_string(),
                    })?,
            },
        };
        let objects = match js.get_object_store(&bucket).await {
            Ok(o) => o,
            Err(_) => match js
                .create_object_store(object_store::Config {
                    bucket: bucket.clone(),
                    storage,
                    num_replicas: settings.replicas,
                    ..Default::default()
                })
                .await
            {
                Ok(o) => o,
                Err(e) => js
                    .get_object_store(&bucket)
                    .await
                    .map_err(|_| BusError::Bucket {
                        bucket: format!("{bucket} (object store)"),
                        reason: e.to_string(),
                    })?,
            },
        };
        Ok(SnapshotStore {
            kv,
            objects,
            bucket,
        })
    }

    /// Saves `blob` as the latest snapshot of `market`.
    pub async fn save(&self, market: &str, blob: &SnapshotBlob) -> Result<Placed, BusError> {
        let current = self.kv.entry(market).await.map_err(|e| {
            failed(
                &self.bucket,
                format!("reading the pointer of {market}: {e}"),
            )
        })?;
        let (revision, old_object) = match &current {
            Some(entry) if entry.operation == kv::Operation::Put => (
                entry.revision,
                rmp_serde::from_slice::<Envelope>(&entry.value)
                    .ok()
                    .and_then(|e| e.object),
            ),
            Some(entry) => (entry.revision, None),
            None => (0, None),
        };
        let placed = if blob.bytes.len() <= INLINE_MAX {
            Placed::Inline
        } else {
            let name = format!("{market}/{}", blob.last_seq);
            let mut reader = blob.bytes.as_slice();
            self.objects
                .put(name.as_str(), &mut reader)
                .await
                .map_err(|e| failed(&self.bucket, format!("writing object {name}: {e}")))?;
            Placed::Object(name)
        };
        let envelope = Envelope {
            market: market.to_string(),
            last_seq: blob.last_seq,
            epoch: blob.epoch,
            encoding: blob.encoding.clone(),
            size: blob.bytes.len() as u64,
            inline: match placed {
                Placed::Inline => blob.bytes.clone(),
                Placed::Object(_) => Vec::new(),
            },
            object: match &placed {
                Placed::Inline => None,
                Placed::Object(name) => Some(name.clone()),
            },
        };
        let value = rmp_serde::to_vec_named(&envelope)
            .map_err(|e| failed(&self.bucket, format!("encoding the pointer: {e}")))?;
        let switched = if current.is_some() {
            self.kv
                .update(market, value.into(), revision)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        } else {
            self.kv
                .create(market, value.into())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        if let Err(reason) = switched {
            if let Placed::Object(name) = &placed
                && old_object.as_deref() != Some(name.as_str())
            {
                let _ = self.objects.delete(name).await;
            }
            return Err(failed(
                &self.bucket,
                format!(
                    "another writer replaced the snapshot of {market} meanwhile ({reason}); this one was dropped"
                ),
            ));
        }
        if let Some(old) = old_object
            && Placed::Object(old.clone()) != placed
        {
            // Best effort: a leftover object wastes space but is never read.
            let _ = self.objects.delete(&old).await;
        }
        Ok(placed)
    }

    /// The latest snapshot of `market`, if any was saved.
    pub async fn load(&self, market: &str) -> Result<Option<SnapshotBlob>, BusError> {
        // The object a pointer names may be deleted by a writer switching the pointer between
        // our two reads: read the pointer again then.
        for _ in 0..3 {
            let entry = self.kv.entry(market).await.map_err(|e| {
                failed(
                    &self.bucket,
                    format!("reading the snapshot of {market}: {e}"),
                )
            })?;
            let Some(entry) = entry else { return Ok(None) };
            if entry.operation != kv::Operation::Put {
                return Ok(None);
            }
            let envelope: Envelope = rmp_serde::from_slice(&entry.value).map_err(|e| {
                failed(
                    &self.bucket,
                    format!("the snapshot pointer of {market} is unreadable: {e}"),
                )
            })?;
            let bytes = match &envelope.object {
                None => envelope.inline,
                Some(name) => match self.read_object(name).await {
                    Ok(bytes) => bytes,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            if bytes.len() as u64 != envelope.size {
                return Err(failed(
                    &self.bucket,
                    format!(
                        "the snapshot of {market} at {} has {} bytes, its pointer says {}",
                        envelope.last_seq,
                        bytes.len(),
                        envelope.size
                    ),
                ));
            }
            return Ok(Some(SnapshotBlob {
                last_seq: envelope.last_seq,
                epoch: envelope.epoch,
                bytes,
                encoding: envelope.encoding,
            }));
        }
        Err(failed(
            &self.bucket,
            format!("the snapshot object of {market} kept disappearing while being read"),
        ))
    }

    /// Forgets the snapshot of `market` (its object too).
    pub async fn delete(&self, market: &str) -> Result<(), BusError> {
        if let Ok(Some(entry)) = self.kv.entry(market).await
            && let Ok(envelope) = rmp_serde::from_slice::<Envelope>(&entry.value)
            && let Some(name) = envelope.object
        {
            let _ = self.objects.delete(&name).await;
        }
        self.kv.purge(market).await.map_err(|e| {
            failed(
                &self.bucket,
                format!("deleting the snapshot of {market}: {e}"),
            )
        })
    }

    async fn read_object(&self, name: &str) -> Result<Vec<u8>, BusError> {
        let mut object = self
            .objects
            .get(name)
            .await
            .map_err(|e| failed(&self.bucket, format!("opening object {name}: {e}")))?;
        let mut bytes = Vec::new();
        object
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| failed(&self.bucket, format!("reading object {name}: {e}")))?;
        Ok(bytes)
    }
}
