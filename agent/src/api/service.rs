//! The tonic handlers. Each validates and converts its request with `TryFrom`, calls
//! the [`ControlPlane`], and converts the answer back; every error is an
//! [`ApiError`] turned into a status by its one `From` impl.

use std::sync::Arc;

use ctoffload_proto::v1 as pb;
use ctoffload_proto::v1::conntrack_service_server::ConntrackService;
use ctoffload_proto::v1::device_service_server::DeviceService;
use ctoffload_proto::v1::event_service_server::EventService;
use ctoffload_proto::v1::nat_service_server::NatService;
use ctoffload_proto::v1::offload_service_server::OffloadService;
use ctoffload_proto::v1::settings_service_server::SettingsService;
use ctoffload_proto::v1::stats_service_server::StatsService;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::control::ControlPlane;
use super::convert::{filter_of, kinds_of, rule_name};
use super::error::ApiError;
use super::model::{ConnKey, LimitsUpdate, ListCursor, NatRule, OffloadPolicy, TimeoutsUpdate};

type Result<T> = std::result::Result<Response<T>, Status>;

/// Default and largest batch of a listing.
const DEFAULT_BATCH: usize = 256;
const MAX_BATCH: u32 = 4096;
/// Journal records copied per lock.
const EVENT_BATCH: usize = 512;
/// Messages buffered per stream before the producer waits for the client.
const STREAM_BUFFER: usize = 16;

/// The handlers of every service, over one control plane.
#[derive(Debug)]
pub struct Api<C> {
    control: Arc<C>,
    shutdown: CancellationToken,
}

impl<C> Clone for Api<C> {
    fn clone(&self) -> Self {
        Self {
            control: Arc::clone(&self.control),
            shutdown: self.shutdown.clone(),
        }
    }
}

impl<C: ControlPlane> Api<C> {
    /// Handlers over `control`; streams end when `shutdown` is cancelled.
    pub fn new(control: Arc<C>, shutdown: CancellationToken) -> Self {
        Self { control, shutdown }
    }
}

fn required<'a, T>(v: Option<&'a T>, field: &str) -> std::result::Result<&'a T, ApiError> {
    v.ok_or_else(|| ApiError::invalid(field, "required"))
}

#[tonic::async_trait]
impl<C: ControlPlane> ConntrackService for Api<C> {
    type ListConnectionsStream =
        ReceiverStream<std::result::Result<pb::ListConnectionsResponse, Status>>;

    async fn list_connections(
        &self,
        req: Request<pb::ListConnectionsRequest>,
    ) -> Result<Self::ListConnectionsStream> {
        let req = req.into_inner();
        let filter = filter_of(req.filter.as_ref())?;
        if req.batch_size > MAX_BATCH {
            return Err(ApiError::invalid(
                "batch_size",
                format!("{} is above {MAX_BATCH}", req.batch_size),
            )
            .into());
        }
        let batch = match req.batch_size {
            0 => DEFAULT_BATCH,
            n => usize::try_from(n).unwrap_or(DEFAULT_BATCH),
        };
        let mut left = if req.limit == 0 { u64::MAX } else { req.limit };
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let control = Arc::clone(&self.control);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut cursor = ListCursor::START;
            loop {
                let max = usize::try_from(left).unwrap_or(usize::MAX).min(batch);
                let page = match control.list(&filter, cursor, max) {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                left -= page.conns.len() as u64;
                let msg = pb::ListConnectionsResponse {
                    connections: page.conns.iter().map(pb::Connection::from).collect(),
                };
                if !msg.connections.is_empty() {
                    tokio::select! {
                        sent = tx.send(Ok(msg)) => if sent.is_err() { return },
                        () = shutdown.cancelled() => {
                            let _ = tx.try_send(Err(ApiError::ShuttingDown.into()));
                            return;
                        }
                    }
                }
                match page.next {
                    Some(next) if left > 0 => cursor = next,
                    _ => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_connection(
        &self,
        req: Request<pb::GetConnectionRequest>,
    ) -> Result<pb::Connection> {
        let key = ConnKey::try_from(req.get_ref().key.as_ref())?;
        let conn = self.control.get(&key)?;
        Ok(Response::new(pb::Connection::from(&conn)))
    }

    async fn delete_connection(
        &self,
        req: Request<pb::DeleteConnectionRequest>,
    ) -> Result<pb::DeleteConnectionResponse> {
        let key = ConnKey::try_from(req.get_ref().key.as_ref())?;
        let conn = self.control.delete(&key)?;
        Ok(Response::new(pb::DeleteConnectionResponse {
            connection: Some(pb::Connection::from(&conn)),
        }))
    }

    async fn delete_connections(
        &self,
        req: Request<pb::DeleteConnectionsRequest>,
    ) -> Result<pb::DeleteConnectionsResponse> {
        let filter = filter_of(req.get_ref().filter.as_ref())?;
        if filter.is_empty() {
            return Err(ApiError::invalid(
                "filter",
                "an empty filter selects every connection; use Flush for that",
            )
            .into());
        }
        let deleted = self.control.delete_matching(&filter)?;
        Ok(Response::new(pb::DeleteConnectionsResponse { deleted }))
    }

    async fn flush(&self, _req: Request<pb::FlushRequest>) -> Result<pb::FlushResponse> {
        let deleted = self.control.flush()?;
        Ok(Response::new(pb::FlushResponse { deleted }))
    }
}

#[tonic::async_trait]
impl<C: ControlPlane> EventService for Api<C> {
    type WatchEventsStream = ReceiverStream<std::result::Result<pb::EventRecord, Status>>;

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Self::WatchEventsStream> {
        let req = req.into_inner();
        let kinds = kinds_of(&req.kinds)?;
        let journal = self.control.journal();
        // Subscribe before reading, so no append between the two is missed.
        let mut head = journal.subscribe();
        let mut pos = match req.from_sequence {
            Some(from) => {
                // Validate now so that a bad position is the call's status.
                journal.read(from, 0)?;
                from
            }
            None => journal.info()?.next_sequence,
        };
        let (tx, rx) = mpsc::channel(STREAM_BUFFER * 16);
        let control = Arc::clone(&self.control);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                head.borrow_and_update();
                let out = match control.journal().read(pos, EVENT_BATCH) {
                    Ok(o) => o,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                pos = out.next;
                if out.records.is_empty() {
                    tokio::select! {
                        changed = head.changed() => if changed.is_err() { return },
                        () = tx.closed() => return,
                        () = shutdown.cancelled() => {
                            let _ = tx.send(Err(ApiError::ShuttingDown.into())).await;
                            return;
                        }
                    }
                    continue;
                }
                for r in &out.records {
                    let wanted = match (&kinds, r.event.kind()) {
                        (None, _) | (_, None) => true,
                        (Some(ks), Some(k)) => ks.contains(&k),
                    };
                    if wanted && tx.send(Ok(pb::EventRecord::from(r))).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_journal_info(
        &self,
        _req: Request<pb::GetJournalInfoRequest>,
    ) -> Result<pb::JournalInfo> {
        let info = self.control.journal().info()?;
        Ok(Response::new(pb::JournalInfo::from(&info)))
    }
}

#[tonic::async_trait]
impl<C: ControlPlane> StatsService for Api<C> {
    async fn get_stats(&self, _req: Request<pb::GetStatsRequest>) -> Result<pb::Stats> {
        let stats = self.control.stats()?;
        Ok(Response::new(pb::Stats::from(&stats)))
    }
}

#[tonic::async_trait]
impl<C: ControlPlane> NatService for Api<C> {
    async fn list_nat_rules(
        &self,
        _req: Request<pb::ListNatRulesRequest>,
    ) -> Result<pb::ListNatRulesResponse> {
        let rules = self.control.nat_rules()?;
        Ok(Response::new(pb::ListNatRulesResponse {
            rules: rules.iter().map(pb::NatRule::from).collect(),
        }))
    }

    async fn add_nat_rule(&self, req: Request<pb::AddNatRuleRequest>) -> Result<pb::NatRule> {
        let rule = required(req.get_ref().rule.as_ref(), "rule")?;
        let rule = NatRule::try_from(rule).map_err(|e| e.within("rule"))?;
        let added = self
            .control
            .add_nat_rule(rule)
            .map_err(|e| e.within("rule"))?;
        Ok(Response::new(pb::NatRule::from(&added)))
    }

    async fn remove_nat_rule(
        &self,
        req: Request<pb::RemoveNatRuleRequest>,
    ) -> Result<pb::RemoveNatRuleResponse> {
        let name = rule_name(&req.get_ref().name, "name")?;
        self.control.remove_nat_rule(&name)?;
        Ok(Response::new(pb::RemoveNatRuleResponse {}))
    }
}

#[tonic::async_trait]
impl<C: ControlPlane> OffloadService for Api<C> {
    async fn get_offload_policy(
        &self,
        _req: Request<pb::GetOffloadPolicyRequest>,
    ) -> Result<pb::OffloadPolicy> {
        let p = self.control.offload_policy()?;
        Ok(Response::new(pb::OffloadPolicy::from(&p)))
    }

    async fn set_offload_policy(
        &self,
        req: Request<pb::SetOffloadPolicyRequest>,
    ) -> Result<pb::OffloadPolicy> {
        let p = required(req.get_ref().policy.as_ref(), "policy")?;
        let p = OffloadPolicy::try_from(p).map_err(|e| e.within("policy"))?;
        let p = self.control.set_offload_policy(p)?;
        Ok(Response::new(pb::OffloadPolicy::from(&p)))
    }

    async fn drain_offload(
        &self,
        req: Request<pb::DrainOffloadRequest>,
    ) -> Result<pb::DrainOffloadResponse> {
        let drained = self.control.drain_offload(req.get_ref().disable)?;
        Ok(Response::new(pb::DrainOffloadResponse { drained }))
    }
}

#[tonic::async_trait]
impl<C: ControlPlane> DeviceService for Api<C> {
    async fn get_device_status(
        &self,
        _req: Request<pb::GetDeviceStatusRequest>,
    ) -> Result<pb::DeviceStatus> {
        let d = self.control.device_status()?;
        Ok(Response::new(pb::DeviceStatus::from(&d)))
    }
}

#[tonic::async_trait]
impl<C: ControlPlane> SettingsService for Api<C> {
    async fn get_timeouts(
        &self,
        _req: Request<pb::GetTimeoutsRequest>,
    ) -> Result<pb::TimeoutsResponse> {
        let t = self.control.timeouts()?;
        Ok(Response::new(pb::TimeoutsResponse {
            timeouts: Some((&t.value).into()),
            restart_required: t.restart_required,
        }))
    }

    async fn set_timeouts(
        &self,
        req: Request<pb::SetTimeoutsRequest>,
    ) -> Result<pb::TimeoutsResponse> {
        let t = required(req.get_ref().timeouts.as_ref(), "timeouts")?;
        let update = TimeoutsUpdate::try_from(t).map_err(|e| e.within("timeouts"))?;
        let t = self.control.set_timeouts(update)?;
        Ok(Response::new(pb::TimeoutsResponse {
            timeouts: Some((&t.value).into()),
            restart_required: t.restart_required,
        }))
    }

    async fn get_limits(&self, _req: Request<pb::GetLimitsRequest>) -> Result<pb::LimitsResponse> {
        let l = self.control.limits()?;
        Ok(Response::new(pb::LimitsResponse {
            limits: Some((&l.value).into()),
            restart_required: l.restart_required,
        }))
    }

    async fn set_limits(&self, req: Request<pb::SetLimitsRequest>) -> Result<pb::LimitsResponse> {
        let l = required(req.get_ref().limits.as_ref(), "limits")?;
        let update = LimitsUpdate::try_from(l).map_err(|e| e.within("limits"))?;
        let l = self.control.set_limits(update)?;
        Ok(Response::new(pb::LimitsResponse {
            limits: Some((&l.value).into()),
            restart_required: l.restart_required,
        }))
    }
}
