//! The `ApiService` behind the CLI. Every method resolves the caller's bearer token and asks
//! [`crate::auth::authorize`]; nothing else decides who may do what.

use std::sync::Arc;

use keywatch_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::{
    alerts::{Alert, AlertStatus, DEFAULT_ROUTE},
    audit::{Actor, AuditFilter, AuditRecord},
    auth::{self, Action, Role, TokenRecord},
    clock::Clock,
    declarations::{Declaration, Kind, Objects, diff},
    enroll::{Enroller, NewJoinToken},
    hosts::{HostSummary, Hosts},
    registry::{RegistryError, RegistryHandle},
    route::{self, NewDelivery, Reason, TeamRoute},
    store::{AlertFilter, Store, StoreError},
    timeline::{Cursor, TimelineQuery},
};

/// The API service.
pub struct Api {
    store: Arc<dyn Store>,
    registry: Arc<RegistryHandle>,
    clock: Arc<dyn Clock>,
    enroller: Option<Arc<Enroller>>,
    hosts: Option<Arc<Hosts>>,
}

/// The tonic server for the API.
pub fn api_server(api: Api) -> pb::api_service_server::ApiServiceServer<Api> {
    pb::api_service_server::ApiServiceServer::new(api).max_decoding_message_size(32 * 1024 * 1024)
}

async fn blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> Result<R, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|_| Status::internal("internal error"))
}

/// The one mapping from store errors to gRPC codes.
fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::NotFound(what) => Status::not_found(format!("{what} not found")),
        StoreError::Conflict(why) => Status::failed_precondition(why),
        StoreError::Closed => Status::unavailable("collector shutting down"),
        other => {
            tracing::error!(error = %other, source = ?std::error::Error::source(&other), "api storage error");
            Status::internal("internal error")
        }
    }
}

fn ns(t: chrono::DateTime<chrono::Utc>) -> u64 {
    t.timestamp_nanos_opt().unwrap_or_default().max(0) as u64
}

fn host_info(h: &HostSummary) -> pb::HostInfo {
    pb::HostInfo { host_id: h.host_id.clone(), json: serde_json::to_string(h).unwrap_or_default() }
}

fn registry_status(e: RegistryError) -> Status {
    match e {
        RegistryError::Invalid(problems) => {
            Status::invalid_argument(format!("{} problem(s)", problems.len()))
        }
        RegistryError::Refused(why) => Status::failed_precondition(why),
        RegistryError::Forbidden(why) => Status::permission_denied(why),
        RegistryError::Store(e) => store_status(e),
    }
}

fn parse_kind(s: &str) -> Result<Kind, Status> {
    Kind::parse_loose(s).ok_or_else(|| {
        Status::invalid_argument(format!(
            "unknown kind {s:?}; expected one of {}",
            Kind::ALL.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
        ))
    })
}

fn alert_to_proto(a: &Alert) -> pb::Alert {
    let ns = |t: chrono::DateTime<chrono::Utc>| {
        t.timestamp_nanos_opt().unwrap_or_default().max(0) as u64
    };
    pb::Alert {
        id: a.id,
        rule: a.rule.to_string(),
        severity: a.severity.to_string(),
        status: a.status.to_string(),
        workload: a.workload.clone(),
        owner: a.owner.clone(),
        host: a.host.id.clone(),
        count: a.count,
        first_seen_ns: ns(a.first_seen),
        last_seen_ns: ns(a.last_seen),
        json: serde_json::to_string(a).unwrap_or_default(),
    }
}

/// The team that owns a declaration, for decisions rights: a workload's owner, or the owner of
/// the workload an approved change names.
fn owning_team(d: &Declaration, objects: &Objects) -> Option<String> {
    match d {
        Declaration::Workload(w) => Some(w.owner.clone()),
        Declaration::ApprovedChange(c) => {
            match objects.get(&(Kind::Workload, c.workload.clone())) {
                Some(Declaration::Workload(w)) => Some(w.owner.clone()),
                _ => None,
            }
        }
        _ => None,
    }
}

impl Api {
    /// The API over a store and registry.
    pub fn new(
        store: Arc<dyn Store>,
        registry: Arc<RegistryHandle>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self { store, registry, clock, enroller: None, hosts: None }
    }

    /// Join tokens come from `enroller`; host revocation goes through `hosts` (so open streams
    /// end at once).
    pub fn with_enrollment(mut self, enroller: Arc<Enroller>, hosts: Arc<Hosts>) -> Self {
        self.enroller = Some(enroller);
        self.hosts = Some(hosts);
        self
    }

    /// The caller's token, from `authorization: Bearer …`.
    async fn caller<T>(&self, request: &Request<T>) -> Result<TokenRecord, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer <token>`"))?;
        let secret =
            header.to_str().ok().and_then(|h| h.strip_prefix("Bearer ")).ok_or_else(|| {
                Status::unauthenticated("expected `authorization: Bearer <token>`")
            })?;
        let hash = auth::hash_secret(secret.trim());
        let store = self.store.clone();
        let token = blocking(move || store.token(&hash))
            .await?
            .map_err(store_status)?
            .ok_or_else(|| Status::unauthenticated("unknown or revoked token"))?;
        if token.expires.is_some_and(|e| e <= self.clock.now()) {
            return Err(Status::unauthenticated("token expired"));
        }
        Ok(token)
    }

    /// Appends audit records; the operation has happened, so a failure is logged, not returned.
    async fn audit(&self, records: Vec<AuditRecord>) {
        if records.is_empty() {
            return;
        }
        let store = self.store.clone();
        match blocking(move || store.append_audit(records)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot record audit records"),
            Err(e) => tracing::error!(error = %e, "cannot record audit records"),
        }
    }

    /// Audit records for applied or deleted declarations (with their revision and diff), and
    /// `declaration-changed` notices to the owner and `secops` for every widened workload.
    async fn record_changes(
        &self,
        who: &TokenRecord,
        changes: &[crate::registry::ObjectChange],
        before: &Objects,
    ) {
        let after = self.registry.snapshot();
        let now = self.clock.now();
        let mut records = Vec::new();
        let mut notices = Vec::new();
        for c in changes.iter().filter(|c| c.action != "unchanged" && c.revision > 0) {
            let key = (c.kind, c.name.clone());
            let (old, new) = (before.get(&key), after.objects.get(&key));
            let yaml = |d: Option<&Declaration>| d.map(Declaration::to_yaml).unwrap_or_default();
            let mut details = serde_json::json!({
                "kind": c.kind.as_str(), "name": c.name, "action": c.action,
                "diff": diff::line_diff(&yaml(old), &yaml(new)),
            });
            if let (Some(Declaration::Workload(o)), Some(Declaration::Workload(n))) = (old, new) {
                let widened = diff::widened(o, n);
                if !widened.is_empty() {
                    let mut teams = vec![n.owner.clone()];
                    if n.owner != DEFAULT_ROUTE {
                        teams.push(DEFAULT_ROUTE.to_owned());
                    }
                    let change = serde_json::json!({
                        "workload": n.name, "owner": n.owner, "revision": c.revision,
                        "actor": Actor::token(who).render(), "time": now,
                        "widened": widened, "diff": details["diff"],
                    });
                    for team in &teams {
                        let route = after.teams.get(team).map(TeamRoute::of).unwrap_or_default();
                        for sink in route.sinks {
                            let delivery_id = route::new_delivery_id();
                            let payload =
                                route::declaration_changed_body(&delivery_id, team, &change);
                            notices.push(NewDelivery {
                                delivery_id,
                                alert_id: None,
                                team: team.clone(),
                                reason: Reason::DeclarationChanged,
                                sink,
                                payload,
                            });
                        }
                    }
                    details["widened"] = serde_json::json!(widened);
                    details["notified"] = serde_json::json!(teams);
                }
            }
            let mut record = AuditRecord::new(
                now,
                &format!("declaration-{}", c.action),
                Actor::token(who),
                format!("{} {}", c.kind, c.name),
                details,
            );
            record.revision = Some(c.revision);
            records.push(record);
        }
        if !notices.is_empty() {
            let store = self.store.clone();
            match blocking(move || store.enqueue(notices, now)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot queue declaration-changed notices")
                }
                Err(e) => tracing::error!(error = %e, "cannot queue declaration-changed notices"),
            }
        }
        self.audit(records).await;
    }

    /// Caller plus authorization of one action.
    async fn authorized<T>(
        &self,
        request: &Request<T>,
        action: Action,
    ) -> Result<TokenRecord, Status> {
        let who = self.caller(request).await?;
        auth::authorize(&who, &action).map_err(|d| Status::permission_denied(d.to_string()))?;
        Ok(who)
    }
}

#[tonic::async_trait]
impl pb::api_service_server::ApiService for Api {
    async fn apply(
        &self,
        request: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let who = self.caller(&request).await?;
        let req = request.into_inner();
        let files: Vec<(String, String)> =
            req.files.into_iter().map(|f| (f.name, f.content)).collect();
        let registry = self.registry.clone();
        let before = registry.snapshot();
        let before_objects = before.objects.clone();
        let actor = who.clone();
        let result = blocking(move || {
            let refused = std::sync::Mutex::new(Vec::new());
            let allowed = |d: &Declaration, after: &Objects| -> Result<(), String> {
                // Both the team that owns it now and the team that would own it must be the caller's.
                let mut teams = vec![owning_team(d, after)];
                if let Some(old) = before.objects.get(&(d.kind(), d.name().to_owned())) {
                    teams.push(owning_team(old, &before.objects));
                }
                for team in teams {
                    if let Err(e) =
                        auth::authorize(&who, &Action::WriteDeclaration { kind: d.kind(), team })
                    {
                        let why = format!("{} {}: {e}", d.kind(), d.name());
                        refused.lock().unwrap_or_else(|e| e.into_inner()).push(why);
                        return Err(e.to_string());
                    }
                }
                Ok(())
            };
            let result = registry.apply(&files, &who.actor(), req.dry_run, &allowed);
            (result, refused.into_inner().unwrap_or_else(|e| e.into_inner()))
        })
        .await?;
        let (result, refused) = result;
        // A declaration the caller may not change refuses the whole apply as permission_denied
        // (the other problems, if any, are reported once the caller may apply it).
        if !refused.is_empty() {
            return Err(Status::permission_denied(refused.join("; ")));
        }
        if let Ok(changes) = &result {
            self.record_changes(&actor, changes, &before_objects).await;
        }
        match result {
            Ok(changes) => Ok(Response::new(pb::ApplyResponse {
                problems: Vec::new(),
                changes: changes
                    .into_iter()
                    .map(|c| pb::ObjectChange {
                        kind: c.kind.to_string(),
                        name: c.name,
                        action: c.action,
                        revision: c.revision,
                    })
                    .collect(),
            })),
            Err(RegistryError::Invalid(problems)) => Ok(Response::new(pb::ApplyResponse {
                problems: problems
                    .into_iter()
                    .map(|p| pb::Problem {
                        file: p.file,
                        document: p.document as u32,
                        object: p.object,
                        field: p.field,
                        message: p.message,
                    })
                    .collect(),
                changes: Vec::new(),
            })),
            Err(e) => Err(registry_status(e)),
        }
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        self.authorized(&request, Action::ReadDeclarations).await?;
        let req = request.into_inner();
        let kind = parse_kind(&req.kind)?;
        let store = self.store.clone();
        let stored = blocking(move || store.declarations()).await?.map_err(store_status)?;
        let objects: Vec<pb::StoredObject> = stored
            .into_iter()
            .filter(|d| {
                d.declaration.kind() == kind
                    && (req.name.is_empty() || d.declaration.name() == req.name)
            })
            .map(|d| pb::StoredObject {
                kind: kind.to_string(),
                name: d.declaration.name().to_owned(),
                revision: d.revision,
                json: serde_json::to_string(&d.declaration).unwrap_or_default(),
            })
            .collect();
        if objects.is_empty() && !req.name.is_empty() {
            return Err(Status::not_found(format!("{kind} {} not found", req.name)));
        }
        Ok(Response::new(pb::GetResponse { objects }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let who = self.caller(&request).await?;
        let req = request.into_inner();
        let kind = parse_kind(&req.kind)?;
        let registry = self.registry.clone();
        let before = registry.snapshot().objects.clone();
        let actor = who.clone();
        let change = blocking(move || {
            let allowed = |d: &Declaration, objects: &Objects| -> Result<(), String> {
                auth::authorize(
                    &who,
                    &Action::WriteDeclaration { kind: d.kind(), team: owning_team(d, objects) },
                )
                .map_err(|e| e.to_string())
            };
            registry.delete(kind, &req.name, &who.actor(), &allowed)
        })
        .await?
        .map_err(registry_status)?;
        self.record_changes(&actor, std::slice::from_ref(&change), &before).await;
        Ok(Response::new(pb::DeleteResponse { revision: change.revision }))
    }

    async fn history(
        &self,
        request: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        self.authorized(&request, Action::ReadDeclarations).await?;
        let req = request.into_inner();
        let kind = parse_kind(&req.kind)?;
        let limit = if req.limit == 0 { 50 } else { req.limit as usize };
        let store = self.store.clone();
        let revs =
            blocking(move || store.history(kind, &req.name, limit)).await?.map_err(store_status)?;
        Ok(Response::new(pb::HistoryResponse {
            revisions: revs
                .into_iter()
                .map(|r| pb::Revision {
                    revision: r.revision,
                    author: r.author,
                    time_ns: r.time.timestamp_nanos_opt().unwrap_or_default().max(0) as u64,
                    action: r.action,
                    diff: r.diff,
                })
                .collect(),
        }))
    }

    async fn list_alerts(
        &self,
        request: Request<pb::ListAlertsRequest>,
    ) -> Result<Response<pb::ListAlertsResponse>, Status> {
        let who = self.authorized(&request, Action::ListAlerts).await?;
        let req = request.into_inner();
        let status = match req.status.as_str() {
            "" => None,
            s => Some(AlertStatus::parse(s).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "unknown status {s:?}; expected open, acknowledged or resolved"
                ))
            })?),
        };
        let nonempty = |s: String| Some(s).filter(|s| !s.is_empty());
        let mut filter = AlertFilter {
            status,
            owner: nonempty(req.owner),
            rule: nonempty(req.rule),
            host: nonempty(req.host),
            workload: nonempty(req.workload),
            team: None,
            limit: req.limit as usize,
        };
        // Owners see the alerts their team owns or was sent, only.
        if who.role == Role::Owner {
            filter.team = who.team.clone();
        }
        let store = self.store.clone();
        let alerts = blocking(move || store.alerts(&filter)).await?.map_err(store_status)?;
        Ok(Response::new(pb::ListAlertsResponse {
            alerts: alerts.iter().map(alert_to_proto).collect(),
        }))
    }

    async fn get_alert(
        &self,
        request: Request<pb::GetAlertRequest>,
    ) -> Result<Response<pb::Alert>, Status> {
        let who = self.caller(&request).await?;
        let id = request.into_inner().id;
        let store = self.store.clone();
        let alert = blocking(move || store.alert(id))
            .await?
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("alert {id} not found")))?;
        auth::authorize(&who, &Action::ReadAlert { teams: alert.teams() })
            .map_err(|d| Status::permission_denied(d.to_string()))?;
        Ok(Response::new(alert_to_proto(&alert)))
    }

    async fn transition_alert(
        &self,
        request: Request<pb::TransitionAlertRequest>,
    ) -> Result<Response<pb::Alert>, Status> {
        let who = self.caller(&request).await?;
        let req = request.into_inner();
        let to = AlertStatus::parse(&req.status)
            .filter(|s| *s != AlertStatus::Open)
            .ok_or_else(|| Status::invalid_argument("status must be acknowledged or resolved"))?;
        let store = self.store.clone();
        let id = req.id;
        let alert = blocking(move || store.alert(id))
            .await?
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("alert {id} not found")))?;
        auth::authorize(&who, &Action::TransitionAlert { team: alert.owner.clone() })
            .map_err(|d| Status::permission_denied(d.to_string()))?;
        let (store, now) = (self.store.clone(), self.clock.now());
        let note = Some(req.note).filter(|n| !n.is_empty());
        let (actor, details) =
            (Actor::token(&who), serde_json::json!({"to": to.as_str(), "note": note}));
        let updated = blocking(move || store.transition(id, to, &who.actor(), note, now))
            .await?
            .map_err(store_status)?;
        let kind = format!("alert-{}", to.as_str());
        self.audit(vec![AuditRecord::new(now, &kind, actor, format!("alert {id}"), details)]).await;
        Ok(Response::new(alert_to_proto(&updated)))
    }

    async fn timeline(
        &self,
        request: Request<pb::TimelineRequest>,
    ) -> Result<Response<pb::TimelineResponse>, Status> {
        let who = self.caller(&request).await?;
        let req = request.into_inner();
        let teams = if who.role == Role::Owner {
            // The teams whose workloads the host runs (events correlated to them).
            let (store, host) = (self.store.clone(), req.host.clone());
            let workloads =
                blocking(move || store.host_workloads(&host)).await?.map_err(store_status)?;
            let reg = self.registry.snapshot();
            let mut teams: Vec<String> = workloads
                .iter()
                .filter_map(|w| reg.workload(w).map(|w| w.workload.owner.clone()))
                .collect();
            teams.sort();
            teams.dedup();
            teams
        } else {
            Vec::new()
        };
        auth::authorize(&who, &Action::ReadTimeline { host: req.host.clone(), teams })
            .map_err(|d| Status::permission_denied(d.to_string()))?;
        let to_time =
            |n: u64| chrono::DateTime::from_timestamp_nanos(i64::try_from(n).unwrap_or(i64::MAX));
        for k in &req.kinds {
            if !crate::event::EventKind::NAMES.contains(&k.as_str()) {
                return Err(Status::invalid_argument(format!(
                    "unknown kind {k:?}; expected one of {}",
                    crate::event::EventKind::NAMES.join(", ")
                )));
            }
        }
        let after = match req.page_token.as_str() {
            "" => None,
            t => Some(t.parse::<Cursor>().map_err(|e| Status::invalid_argument(e.to_string()))?),
        };
        let query = TimelineQuery {
            host_id: req.host.clone(),
            from: to_time(req.from_ns),
            to: if req.to_ns == 0 { to_time(u64::MAX >> 1) } else { to_time(req.to_ns) },
            pid: req.pid,
            kinds: req.kinds,
            after,
            limit: if req.page_size == 0 { 500 } else { req.page_size.min(10_000) as usize },
        };
        let store = self.store.clone();
        let host = req.host;
        let page = blocking(move || {
            if store.host(&host)?.is_none() {
                return Err(StoreError::NotFound(format!(
                    "host {host:?} (no sensor with that id ever connected);"
                )));
            }
            store.timeline(&query)
        })
        .await?
        .map_err(store_status)?;
        Ok(Response::new(pb::TimelineResponse {
            entries: page
                .entries
                .iter()
                .map(|e| pb::TimelineEntry {
                    time_ns: e.time.timestamp_nanos_opt().unwrap_or_default().max(0) as u64,
                    kind: e.kind.clone(),
                    pid: e.pid,
                    summary: e.summary.clone(),
                    json: serde_json::to_string(e).unwrap_or_default(),
                })
                .collect(),
            next_page_token: page.next.unwrap_or_default(),
        }))
    }

    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let who = self.authorized(&request, Action::ManageTokens).await?;
        let req = request.into_inner();
        let role = Role::parse(&req.role).ok_or_else(|| {
            Status::invalid_argument(format!(
                "unknown role {:?}; expected one of {}",
                req.role,
                Role::ALL.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", ")
            ))
        })?;
        let team = Some(req.team).filter(|t| !t.is_empty());
        if role == Role::Sensor {
            // Sensors do not call the API: a sensor token is a join token for enrollment.
            if team.is_some() {
                return Err(Status::invalid_argument("only owner tokens belong to a team"));
            }
            let enroller = self.enroller.clone().ok_or_else(|| {
                Status::failed_precondition("this collector has no CA; it cannot enroll sensors")
            })?;
            let ttl = if req.ttl_s == 0 { 3_600 } else { req.ttl_s };
            let ttl = i64::try_from(ttl)
                .ok()
                .filter(|t| *t <= 366 * 86_400)
                .ok_or_else(|| Status::invalid_argument("--ttl may be at most 366 days"))?;
            let new = NewJoinToken {
                labels: req.labels.into_iter().collect(),
                ttl: chrono::Duration::seconds(ttl),
                uses: if req.uses == 0 { 1 } else { req.uses },
                creator: who.actor(),
            };
            let store = self.store.clone();
            let (text, record) = blocking(move || enroller.create_token(store.as_ref(), new))
                .await?
                .map_err(store_status)?;
            tracing::info!(token = %record.id, labels = ?record.labels, uses = record.uses_left, expires = %record.expires, creator = %record.creator, "join token created");
            let details = serde_json::json!({
                "role": "sensor", "labels": record.labels, "uses": record.uses_left, "expires": record.expires,
            });
            let object = format!("join token {}", record.id);
            let rec = AuditRecord::new(
                self.clock.now(),
                "join-token-created",
                Actor::token(&who),
                object,
                details,
            );
            self.audit(vec![rec]).await;
            return Ok(Response::new(pb::CreateTokenResponse {
                token: text.to_string(),
                id: 0,
                join_token_id: record.id,
                expires_ns: ns(record.expires),
            }));
        }
        match (role, &team) {
            (Role::Owner, None) => {
                return Err(Status::invalid_argument("an owner token needs --team"));
            }
            (Role::Owner, Some(t)) if !self.registry.snapshot().teams.contains_key(t) => {
                return Err(Status::failed_precondition(format!("team {t:?} is not declared")));
            }
            (Role::Owner, Some(_)) => {}
            (_, Some(_)) => {
                return Err(Status::invalid_argument("only owner tokens belong to a team"));
            }
            (_, None) => {}
        }
        let name = if req.name.is_empty() { format!("{role}-token") } else { req.name };
        let secret = auth::new_secret();
        let now = self.clock.now();
        // API tokens: ttl 0 means until revoked.
        let expires = match req.ttl_s {
            0 => None,
            s => Some(
                i64::try_from(s)
                    .ok()
                    .filter(|s| *s <= 10 * 366 * 86_400)
                    .map(|s| now + chrono::Duration::seconds(s))
                    .ok_or_else(|| Status::invalid_argument("--ttl may be at most 10 years"))?,
            ),
        };
        let record = TokenRecord { id: 0, name, role, team, created: now, expires };
        let (store, hash, rec) = (self.store.clone(), auth::hash_secret(&secret), record.clone());
        let id = blocking(move || store.put_token(&rec, &hash)).await?.map_err(store_status)?;
        let details = serde_json::json!({
            "name": record.name, "role": record.role.as_str(), "team": record.team, "expires": record.expires,
        });
        let rec = AuditRecord::new(
            now,
            "token-created",
            Actor::token(&who),
            format!("token {id}"),
            details,
        );
        self.audit(vec![rec]).await;
        Ok(Response::new(pb::CreateTokenResponse {
            token: secret,
            id,
            join_token_id: String::new(),
            expires_ns: expires.map(ns).unwrap_or_default(),
        }))
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        self.authorized(&request, Action::ManageTokens).await?;
        let store = self.store.clone();
        let (api, join) =
            blocking(move || Ok::<_, StoreError>((store.api_tokens()?, store.join_tokens()?)))
                .await?
                .map_err(store_status)?;
        let mut tokens: Vec<pb::TokenInfo> = api
            .into_iter()
            .map(|(t, revoked)| pb::TokenInfo {
                kind: "api".into(),
                id: t.id.to_string(),
                name: t.name,
                role: t.role.to_string(),
                team: t.team.unwrap_or_default(),
                created_ns: ns(t.created),
                revoked_ns: revoked.map(ns).unwrap_or_default(),
                expires_ns: t.expires.map(ns).unwrap_or_default(),
                ..Default::default()
            })
            .collect();
        tokens.extend(join.into_iter().map(|t| pb::TokenInfo {
            kind: "join".into(),
            id: t.id,
            name: String::new(),
            role: t.role,
            team: String::new(),
            created_ns: ns(t.created),
            revoked_ns: t.revoked.map(ns).unwrap_or_default(),
            expires_ns: ns(t.expires),
            uses_left: t.uses_left,
            creator: t.creator,
            labels: t.labels.into_iter().collect(),
        }));
        Ok(Response::new(pb::ListTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let who = self.authorized(&request, Action::ManageTokens).await?;
        let id = request.into_inner().id;
        let (store, now) = (self.store.clone(), self.clock.now());
        let (kind, object) = match id.parse::<i64>() {
            Ok(_) if id.len() != 12 => ("token-revoked", format!("token {id}")),
            _ => ("join-token-revoked", format!("join token {id}")),
        };
        match id.parse::<i64>() {
            Ok(n) if id.len() != 12 => {
                if n == who.id {
                    return Err(Status::failed_precondition(
                        "refusing to revoke the token this request uses",
                    ));
                }
                blocking(move || store.revoke_api_token(n, now)).await?.map_err(store_status)?;
            }
            _ => {
                blocking(move || store.revoke_join_token(&id, now)).await?.map_err(store_status)?
            }
        }
        let rec = AuditRecord::new(now, kind, Actor::token(&who), object, serde_json::json!({}));
        self.audit(vec![rec]).await;
        Ok(Response::new(pb::RevokeTokenResponse {}))
    }

    async fn list_hosts(
        &self,
        request: Request<pb::ListHostsRequest>,
    ) -> Result<Response<pb::ListHostsResponse>, Status> {
        self.authorized(&request, Action::ReadHosts).await?;
        let store = self.store.clone();
        let hosts = blocking(move || store.host_summaries()).await?.map_err(store_status)?;
        Ok(Response::new(pb::ListHostsResponse { hosts: hosts.iter().map(host_info).collect() }))
    }

    async fn revoke_host(
        &self,
        request: Request<pb::RevokeHostRequest>,
    ) -> Result<Response<pb::RevokeHostResponse>, Status> {
        let who = self.authorized(&request, Action::RevokeHost).await?;
        let host_id = request.into_inner().host_id;
        let hosts = self
            .hosts
            .clone()
            .ok_or_else(|| Status::failed_precondition("this collector does not enroll hosts"))?;
        let (store, now, id) = (self.store.clone(), self.clock.now(), host_id.clone());
        blocking(move || hosts.revoke(&id, now)).await?.map_err(store_status)?;
        tracing::warn!(host = %host_id, by = %who.actor(), "host revoked");
        let rec = AuditRecord::new(
            now,
            "host-revoked",
            Actor::token(&who),
            format!("host {host_id}"),
            serde_json::json!({}),
        );
        self.audit(vec![rec]).await;
        let summary = blocking(move || store.host_summaries())
            .await?
            .map_err(store_status)?
            .into_iter()
            .find(|h| h.host_id == host_id);
        Ok(Response::new(pb::RevokeHostResponse { host: summary.as_ref().map(host_info) }))
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        self.authorized(&request, Action::ReadAudit).await?;
        let req = request.into_inner();
        let filter = AuditFilter {
            since: (req.since_ns != 0).then(|| {
                chrono::DateTime::from_timestamp_nanos(
                    i64::try_from(req.since_ns).unwrap_or(i64::MAX),
                )
            }),
            kinds: req.kinds,
            limit: req.limit as usize,
        };
        let store = self.store.clone();
        let records = blocking(move || store.audit(&filter)).await?.map_err(store_status)?;
        Ok(Response::new(pb::ListAuditResponse {
            records: records
                .iter()
                .map(|r| pb::AuditRecord {
                    id: r.id,
                    time_ns: ns(r.time),
                    kind: r.kind.clone(),
                    json: serde_json::to_string(r).unwrap_or_default(),
                })
                .collect(),
        }))
    }

    async fn who_am_i(
        &self,
        request: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let who = self.authorized(&request, Action::WhoAmI).await?;
        Ok(Response::new(pb::WhoAmIResponse {
            name: who.name,
            role: who.role.to_string(),
            team: who.team.unwrap_or_default(),
        }))
    }
}
