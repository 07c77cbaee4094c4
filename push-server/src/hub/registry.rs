//! The registry's face of the hub, for enrollment, the CLI and the dashboard: register, re-issue
//! and revoke devices, set PushKit tokens, list devices and groups.

use std::sync::Arc;

use apns_bridge::DeviceToken;
use parking_lot::Mutex;
use push_proto::device::GoodbyeReason;

use super::{Hub, Slot, device::DeviceCore, device::Effects};
use crate::store::{DeviceRecord, RedisStore, StoreError};

/// Presence and registry facts about one device, for listings.
#[derive(Debug, Clone)]
pub struct DeviceView {
    /// The registry record.
    pub record: DeviceRecord,
    /// Whether a session is live.
    pub online: bool,
    /// Unix ms the live session started.
    pub session_started_ms: Option<i64>,
    /// The device's clock minus ours at the live session's hello, if it reported its clock.
    pub clock_offset_ms: Option<i64>,
    /// Pushes queued.
    pub queued: usize,
    /// Cluster mode: the node holding the device (its session's node), if any.
    pub node: Option<String>,
}

impl Hub {
    /// Facts about one device, or `None` if unknown (or the cluster store failed).
    pub async fn device_view(&self, device_id: &str) -> Option<DeviceView> {
        if let Some(device) = self.device(device_id) {
            return Some(self.view(&device.lock().core));
        }
        let redis = &self.0.cluster.as_ref()?.redis;
        let (record, queued) = redis.device(device_id).await.ok()??;
        let node = redis
            .holders(&[device_id.to_string()])
            .await
            .ok()
            .and_then(|h| h.into_iter().next().flatten());
        Some(remote_view(record, queued, node))
    }

    /// Register a device or update its groups; returns the credential generation to issue at.
    /// For a device already registered the generation goes up, so every credential issued
    /// before stops working (a re-issued phone must not be pushed out by the old credential),
    /// and a session opened with one of them ends (`CREDENTIAL_REVOKED`). A revoked device
    /// becomes usable again with the new credential.
    pub async fn register_device(&self, device_id: &str, groups: Vec<String>) -> Result<u64, StoreError> {
        if self.is_clustered() {
            if self.create_remote(device_id, &groups).await? {
                return Ok(0);
            }
            // Re-issue: this node takes the device (its session ends anyway) and decides.
            self.hold(device_id, true).await?;
            let result = match self.device(device_id) {
                Some(device) => self.finish_registration(device_id, &device, groups, false).await,
                None => Err(StoreError::Redis(format!("device {device_id} could not be held"))),
            };
            self.release_if_idle(device_id).await;
            return result;
        }
        let (device, created) = self.registry_entry(device_id);
        self.finish_registration(device_id, &device, groups, created)
            .await
    }

    /// Cluster mode: create the device in Redis if absent; false if it exists.
    async fn create_remote(&self, device_id: &str, groups: &[String]) -> Result<bool, StoreError> {
        let Some(link) = &self.0.cluster else {
            return Ok(false);
        };
        let mut record = DeviceCore::registered(device_id, self.now()).record;
        record.groups = groups.to_vec();
        record.ca_generation = self.ca_generation();
        link.redis.create_device(&record).await
    }

    /// Register `device_id` only if it is not registered yet; `None` if it is. The check and the
    /// creation happen under the registry's write lock, so of two concurrent calls for one new
    /// id exactly one registers it (an `enroll` key must never take over an existing phone).
    pub async fn register_new_device(
        &self,
        device_id: &str,
        groups: Vec<String>,
    ) -> Result<Option<u64>, StoreError> {
        if self.is_clustered() {
            return Ok(self.create_remote(device_id, &groups).await?.then_some(0));
        }
        let (device, created) = self.registry_entry(device_id);
        if !created {
            return Ok(None);
        }
        self.finish_registration(device_id, &device, groups, true)
            .await
            .map(Some)
    }

    /// The device's slot, created (no groups, generation 0) when unknown; the bool says
    /// whether this call created it.
    fn registry_entry(&self, device_id: &str) -> (Arc<Mutex<Slot>>, bool) {
        use std::collections::hash_map::Entry;
        let now = self.now();
        let mut devices = self.0.devices.write();
        match devices.entry(device_id.to_string()) {
            Entry::Occupied(e) => (e.get().clone(), false),
            Entry::Vacant(e) => {
                let slot = Slot::new(DeviceCore::registered(device_id, now));
                (e.insert(Arc::new(Mutex::new(slot))).clone(), true)
            }
        }
    }

    /// Set the groups and, for a device that existed, move to a new credential generation
    /// (see [`Hub::register_device`]); returns the generation to issue at.
    async fn finish_registration(
        &self,
        device_id: &str,
        device: &Mutex<Slot>,
        groups: Vec<String>,
        created: bool,
    ) -> Result<u64, StoreError> {
        let (record, old_groups, pending) = {
            let cx = self.ctx();
            let slot = &mut *device.lock();
            let mut fx = Effects::default();
            let (old, ended) = slot.core.register(&mut fx, cx, groups, !created);
            if let Some(s) = ended {
                let why = "credential re-issued";
                self.close_session(slot, s.id, GoodbyeReason::CredentialRevoked, why, cx.now);
            }
            let pending = self.apply(slot, fx);
            (slot.core.record.clone(), old, pending)
        };
        {
            let mut idx = self.0.groups.write();
            for g in &old_groups {
                if let Some(members) = idx.get_mut(g) {
                    members.remove(device_id);
                }
            }
            for g in &record.groups {
                idx.entry(g.clone()).or_default().insert(device_id.into());
            }
        }
        self.settle(vec![pending]).await?;
        Ok(record.credential_generation)
    }

    /// Revoke every credential of the device, close its session and report its queue as
    /// undeliverable. Returns whether a session was closed, or `None` for an unknown device.
    pub async fn revoke_device(&self, device_id: &str) -> Result<Option<bool>, StoreError> {
        if self.is_clustered() {
            if !self.hold(device_id, true).await? {
                return Ok(None);
            }
            let result = self.revoke_held(device_id).await;
            self.release_if_idle(device_id).await;
            return result;
        }
        self.revoke_held(device_id).await
    }

    async fn revoke_held(&self, device_id: &str) -> Result<Option<bool>, StoreError> {
        let Some(device) = self.device(device_id) else {
            return Ok(None);
        };
        let (closed, pending) = {
            let cx = self.ctx();
            let slot = &mut *device.lock();
            let mut fx = Effects::default();
            let ended = slot.core.revoke(&mut fx, cx);
            if let Some(s) = ended {
                let why = "credential revoked";
                self.close_session(slot, s.id, GoodbyeReason::CredentialRevoked, why, cx.now);
            }
            (ended.is_some(), self.apply(slot, fx))
        };
        self.settle(vec![pending]).await?;
        Ok(Some(closed))
    }

    /// Register (`Some`) or clear (`None`) a device's PushKit token from the admin API; returns
    /// once durable, `None` for an unknown device.
    pub async fn set_voip_token(
        &self,
        device_id: &str,
        token: Option<DeviceToken>,
    ) -> Result<Option<()>, StoreError> {
        let Some(device) = self.device(device_id) else {
            return self.forward_token(device_id, token.as_ref()).await;
        };
        let pending = {
            let slot = &mut *device.lock();
            let mut fx = Effects::default();
            slot.core.set_token(&mut fx, token);
            self.apply(slot, fx)
        };
        self.settle(vec![pending]).await?;
        Ok(Some(()))
    }

    /// Every device (optionally one group's, optionally only online ones), ordered by id.
    pub async fn list_devices(
        &self,
        group: Option<&str>,
        online_only: bool,
    ) -> Result<Vec<DeviceView>, StoreError> {
        let mut views = match &self.0.cluster {
            Some(link) => self.list_remote(&link.redis, group).await?,
            None => {
                let ids: Vec<String> = match group {
                    Some(g) => self.group_members(g).await?,
                    None => self.0.devices.read().keys().cloned().collect(),
                };
                ids.iter()
                    .filter_map(|id| self.device(id))
                    .map(|device| self.view(&device.lock().core))
                    .collect()
            }
        };
        views.retain(|v| !online_only || v.online);
        views.sort_by(|a, b| a.record.device_id.cmp(&b.record.device_id));
        Ok(views)
    }

    /// Cluster mode: every device from Redis, with the node holding each; the ones held here
    /// from this node's own state (fresher than Redis by the writes in flight).
    async fn list_remote(
        &self,
        redis: &RedisStore,
        group: Option<&str>,
    ) -> Result<Vec<DeviceView>, StoreError> {
        let mut all = redis.devices().await?;
        if let Some(g) = group {
            let members: std::collections::HashSet<String> =
                redis.group_members(g).await?.into_iter().collect();
            all.retain(|(r, _)| members.contains(&r.device_id));
        }
        let ids: Vec<String> = all.iter().map(|(r, _)| r.device_id.clone()).collect();
        let holders = redis.holders(&ids).await?;
        Ok(all
            .into_iter()
            .zip(holders)
            .map(|((record, queued), node)| match self.device(&record.device_id) {
                Some(device) => self.view(&device.lock().core),
                None => remote_view(record, queued, node),
            })
            .collect())
    }

    /// Ids of the devices in group `g`.
    pub(super) async fn group_members(&self, g: &str) -> Result<Vec<String>, StoreError> {
        if let Some(link) = &self.0.cluster {
            return link.redis.group_members(g).await;
        }
        Ok(self
            .0
            .groups
            .read()
            .get(g)
            .into_iter()
            .flatten()
            .cloned()
            .collect())
    }

    fn view(&self, core: &DeviceCore) -> DeviceView {
        DeviceView {
            record: core.record.clone(),
            online: core.session.is_some(),
            session_started_ms: core.session.map(|s| s.started_ms),
            clock_offset_ms: core.session.and_then(|s| s.clock_offset_ms),
            queued: core.outbox.len(),
            node: self.0.cluster.as_ref().map(|l| l.redis.node().to_string()),
        }
    }
}

/// A device held by another node (or none), as Redis has it. A held device counts as online:
/// nodes hold devices for their sessions, and only for a moment otherwise.
fn remote_view(record: DeviceRecord, queued: usize, node: Option<String>) -> DeviceView {
    DeviceView {
        record,
        online: node.is_some(),
        session_started_ms: None,
        clock_offset_ms: None,
        queued,
        node,
    }
}
