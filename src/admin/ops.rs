//! Admin operations shared by the JSON API and the console: create,
//! re-password, remove and forget identities, invite them, and the views of
//! identities, invitations and the audit log. Every action is audited
//! (actor `api` or `console`) without secrets, and followed by a reload so
//! a running server serves the new state at once.

use crate::app::App;
use crate::names::{self, NameError};
use crate::onboarding::import::{ImportError, Imported};
use crate::onboarding::invite::{self, InviteError};
use crate::secret::Secret;
use crate::store::{
    AuditEntry, IdentityRecord, InvitationRecord, Mode, NewAudit, NewIdentity, Status, StoreError,
    ValidationRecord, DEFAULT_TENANT,
};
use base64::Engine as _;
use rand::Rng;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use utoipa::ToSchema;

/// Most identities one invitation request may name.
pub const MAX_BATCH: usize = 1000;
/// Longest local password accepted.
const MAX_PASSWORD_CHARS: usize = 1024;

/// Why an admin operation failed; each has a stable code and an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No identity with that name.
    #[error("no identity named `{0}`")]
    NotFound(String),
    /// The name is taken.
    #[error("an identity named `{0}` already exists")]
    AlreadyExists(String),
    /// The name breaks the naming rules.
    #[error("invalid identity name: {0}")]
    InvalidName(NameError),
    /// The mailbox is not `local@domain`.
    #[error("invalid mailbox: {0}")]
    InvalidMailbox(NameError),
    /// The password is empty or too long.
    #[error("{0}")]
    InvalidPassword(&'static str),
    /// The identity has no mailbox (it was forgotten).
    #[error("identity `{0}` has no mailbox; give one (`mailbox`) to invite it")]
    NoMailbox(String),
    /// The identity exists with another mailbox.
    #[error("identity `{0}` already has another mailbox")]
    MailboxConflict(String),
    /// The request makes no sense (empty list, duplicates, ...).
    #[error("{0}")]
    Invalid(String),
    /// A CSV import was refused (nothing was imported).
    #[error("{0}")]
    Import(ImportError),
    /// The store failed.
    #[error("the store failed; see the server log")]
    Store(#[from] StoreError),
    /// Something else failed inside authswap.
    #[error("internal error; see the server log")]
    Internal(String),
}

impl AdminError {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            AdminError::NotFound(_) => "not_found",
            AdminError::AlreadyExists(_) => "already_exists",
            AdminError::InvalidName(_) => "invalid_name",
            AdminError::InvalidMailbox(_) => "invalid_mailbox",
            AdminError::InvalidPassword(_) => "invalid_password",
            AdminError::NoMailbox(_) => "no_mailbox",
            AdminError::MailboxConflict(_) => "mailbox_conflict",
            AdminError::Invalid(_) => "invalid_request",
            AdminError::Import(ImportError::File(_)) => "invalid_csv",
            AdminError::Import(ImportError::Rows(_)) => "invalid_rows",
            AdminError::Import(ImportError::Hash(_)) => "internal_error",
            AdminError::Import(ImportError::Store(_)) | AdminError::Store(_) => "store_error",
            AdminError::Internal(_) => "internal_error",
        }
    }

    /// HTTP status.
    pub fn status(&self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            AdminError::NotFound(_) => S::NOT_FOUND,
            AdminError::AlreadyExists(_)
            | AdminError::NoMailbox(_)
            | AdminError::MailboxConflict(_) => S::CONFLICT,
            AdminError::InvalidName(_)
            | AdminError::InvalidMailbox(_)
            | AdminError::InvalidPassword(_)
            | AdminError::Invalid(_)
            | AdminError::Import(ImportError::File(_) | ImportError::Rows(_)) => {
                S::UNPROCESSABLE_ENTITY
            }
            AdminError::Import(_) | AdminError::Store(_) | AdminError::Internal(_) => {
                S::INTERNAL_SERVER_ERROR
            }
        }
    }

    fn outcome(&self) -> &'static str {
        if self.status().is_server_error() {
            "failed"
        } else {
            "refused"
        }
    }
}

impl From<InviteError> for AdminError {
    fn from(e: InviteError) -> Self {
        match e {
            InviteError::NoMailbox(name) => AdminError::NoMailbox(name),
            InviteError::Store(e) => AdminError::Store(e),
        }
    }
}

/// How the local password of an identity is set.
#[derive(Debug, Clone)]
pub enum PasswordChoice {
    /// This one.
    Given(Secret),
    /// A random one, shown once.
    Generate,
    /// None yet (a random one nobody knows; set it later).
    Later,
}

impl PasswordChoice {
    /// From the request fields `password` and `generate`.
    pub fn from_fields(password: Option<Secret>, generate: bool) -> Result<Self, AdminError> {
        match (password, generate) {
            (Some(_), true) => Err(AdminError::Invalid(
                "give either `password` or `generate`, not both".into(),
            )),
            (Some(p), false) => Ok(PasswordChoice::Given(p)),
            (None, true) => Ok(PasswordChoice::Generate),
            (None, false) => Ok(PasswordChoice::Later),
        }
    }

    fn check(&self) -> Result<(), AdminError> {
        if let PasswordChoice::Given(p) = self {
            if p.is_empty() {
                return Err(AdminError::InvalidPassword(
                    "the password must not be empty",
                ));
            }
            if p.expose().chars().count() > MAX_PASSWORD_CHARS {
                return Err(AdminError::InvalidPassword(
                    "the password is longer than 1024 characters",
                ));
            }
        }
        Ok(())
    }
}

/// A generated local password: 20 characters, base64url (120 bits).
pub fn generate_password() -> Secret {
    let bytes: [u8; 15] = rand::rng().random();
    Secret::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// Which identities a list shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StatusFilter {
    /// Every identity.
    #[default]
    All,
    /// Linked, and the last refresh (if any) succeeded.
    Ok,
    /// Everything needing attention: pending, needs re-auth, upstream
    /// refused, or a failing last refresh.
    Error,
}

impl StatusFilter {
    /// Parses `all`, `ok` or `error`.
    pub fn parse(s: &str) -> Option<StatusFilter> {
        match s {
            "" | "all" => Some(StatusFilter::All),
            "ok" => Some(StatusFilter::Ok),
            "error" => Some(StatusFilter::Error),
            _ => None,
        }
    }

    /// The query form.
    pub fn as_str(self) -> &'static str {
        match self {
            StatusFilter::All => "all",
            StatusFilter::Ok => "ok",
            StatusFilter::Error => "error",
        }
    }
}

/// RFC 3339 (UTC, seconds) of Unix seconds.
pub fn rfc3339(t: i64) -> String {
    let t = u64::try_from(t).unwrap_or(0);
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(t)).to_string()
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The Microsoft account that linked an identity.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AccountView {
    /// `preferred_username` of the account.
    pub upn: String,
    /// Object id.
    pub oid: String,
    /// Tenant id.
    pub tid: String,
}

/// The last end-to-end validation of one protocol.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ValidationView {
    /// `ews`/`http`, `smtp`, `imap` or `pop3`.
    pub protocol: String,
    /// When (RFC 3339).
    pub at: String,
    /// Whether the upstream accepted it.
    pub ok: bool,
    /// The upstream's own answer.
    pub answer: String,
    /// What it means.
    pub meaning: String,
}

impl From<&ValidationRecord> for ValidationView {
    fn from(v: &ValidationRecord) -> Self {
        ValidationView {
            protocol: v.protocol.clone(),
            at: rfc3339(v.at),
            ok: v.ok,
            answer: v.answer.clone(),
            meaning: v.meaning.clone(),
        }
    }
}

/// One identity as the admin sees it: stored state, live token state and
/// failure counts.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct IdentityView {
    /// Name the legacy client sends.
    pub name: String,
    /// Upstream mailbox (empty after `forget`).
    pub mailbox: String,
    /// `pending`, `linked`, `needs_reauth`, `upstream_refused`, or
    /// `app_credential` while the tenant's app credential is refused.
    pub status: String,
    /// Configured tenant.
    pub tenant: String,
    /// `delegated` or `app`.
    pub mode: String,
    /// Linked and the last refresh did not fail.
    pub ok: bool,
    /// What the status means, in plain words.
    pub status_text: String,
    /// Whether a refresh token is stored.
    pub has_refresh_token: bool,
    /// The last error, in the words of the identity platform or upstream.
    pub last_error: Option<String>,
    /// Since when it fails (RFC 3339): the last failed refresh.
    pub last_failure_at: Option<String>,
    /// The last successful refresh (RFC 3339).
    pub last_success_at: Option<String>,
    /// When the identity was created (RFC 3339).
    pub created_at: String,
    /// When a person last linked it (RFC 3339).
    pub linked_at: Option<String>,
    /// The Microsoft account that linked it (browser sign-in).
    pub account: Option<AccountView>,
    /// When the cached access token expires (RFC 3339), if one is cached.
    pub access_token_expires_at: Option<String>,
    /// Last validation result per protocol.
    pub validations: Vec<ValidationView>,
    /// Client failures since start, per protocol (`http`, `smtp`, `imap`, `pop3`).
    pub failures: BTreeMap<String, u64>,
    /// EWS requests since start by SOAP operation, most used first (for
    /// planning the EWS retirement).
    pub ews_operations: Vec<EwsOperationView>,
}

/// One EWS operation an identity used, and how often.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EwsOperationView {
    /// The operation (`FindItem`, …, or `other`).
    pub operation: String,
    /// Requests since start.
    pub count: u64,
}

/// Plain words for a status.
pub fn status_text(r: &IdentityRecord) -> &'static str {
    if r.tenant_block.is_some() {
        return "Blocked by the tenant's app credential (secret expired or wrong, certificate refused): an administrator must renew it; nobody needs to sign in again.";
    }
    match (r.mode, r.status) {
        (Mode::App, Status::Linked) if r.is_ok() => {
            return "App-only: the tenant's app credential acts for this mailbox."
        }
        (Mode::App, Status::Linked) => {
            return "App-only, but the last token request failed (retrying)."
        }
        _ => {}
    }
    match r.status {
        Status::Pending => "Not linked yet: invite the user to sign in with Microsoft.",
        Status::Linked if r.is_ok() => "Linked and working.",
        Status::Linked => "Linked, but the last token refresh failed (retrying).",
        Status::NeedsReauth => {
            "Microsoft refused the stored sign-in: the user must sign in again (re-invite them)."
        }
        Status::UpstreamRefused => {
            "The mail server refuses this mailbox for a reason no new token cures; see the error."
        }
    }
}

/// Reads identities with everything the admin sees, live from the store.
pub async fn identity_views(
    app: &App,
    filter: StatusFilter,
    search: &str,
) -> Result<Vec<IdentityView>, AdminError> {
    let records = app.store.list().await?;
    let needle = search.trim().to_lowercase();
    let records: Vec<IdentityRecord> = records
        .into_iter()
        .filter(|r| match filter {
            StatusFilter::All => true,
            StatusFilter::Ok => r.is_ok(),
            StatusFilter::Error => !r.is_ok(),
        })
        .filter(|r| {
            needle.is_empty()
                || r.name.to_lowercase().contains(&needle)
                || r.mailbox.to_lowercase().contains(&needle)
                || r.shown_status().contains(&needle)
                || r.tenant.contains(&needle)
                || r.account
                    .as_ref()
                    .is_some_and(|a| a.upn.to_lowercase().contains(&needle))
        })
        .collect();
    let mut validations: HashMap<i64, Vec<ValidationView>> = HashMap::new();
    for (id, v) in app.store.validations().await? {
        validations.entry(id).or_default().push((&v).into());
    }
    Ok(records
        .iter()
        .map(|r| view(app, r, validations.remove(&r.id).unwrap_or_default()))
        .collect())
}

fn view(app: &App, r: &IdentityRecord, validations: Vec<ValidationView>) -> IdentityView {
    IdentityView {
        name: r.name.clone(),
        mailbox: r.mailbox.clone(),
        status: r.shown_status().to_owned(),
        tenant: r.tenant.clone(),
        mode: r.mode.as_str().to_owned(),
        ok: r.is_ok(),
        status_text: status_text(r).to_owned(),
        has_refresh_token: r.has_refresh_token,
        last_error: r.shown_error().map(str::to_owned),
        last_failure_at: r.last_failure_at.map(rfc3339),
        last_success_at: r.last_success_at.map(rfc3339),
        created_at: rfc3339(r.created_at),
        linked_at: r.linked_at.map(rfc3339),
        account: r.account.as_ref().map(|a| AccountView {
            upn: a.upn.clone(),
            oid: a.oid.clone(),
            tid: a.tid.clone(),
        }),
        access_token_expires_at: app.tokens.cached_expiry(r.id).map(|t| rfc3339(unix(t))),
        validations,
        failures: app
            .metrics
            .failure_counts(&r.name)
            .into_iter()
            .map(|(p, n)| (format!("{p:?}"), n))
            .collect(),
        ews_operations: app
            .metrics
            .ews_operations(&r.name)
            .into_iter()
            .map(|(operation, count)| EwsOperationView {
                operation: operation.to_owned(),
                count,
            })
            .collect(),
    }
}

/// One identity's view.
pub async fn identity_view(app: &App, name: &str) -> Result<IdentityView, AdminError> {
    let r = get(app, name).await?;
    let validations = app
        .store
        .validations()
        .await?
        .into_iter()
        .filter(|(id, _)| *id == r.id)
        .map(|(_, v)| (&v).into())
        .collect();
    Ok(view(app, &r, validations))
}

async fn get(app: &App, name: &str) -> Result<IdentityRecord, AdminError> {
    app.store
        .get(name)
        .await?
        .ok_or_else(|| AdminError::NotFound(name.to_owned()))
}

/// An identity name fit for the audit log (bounded; it may come from a
/// request for an identity that does not exist).
fn audit_name(name: &str) -> String {
    name.chars().take(128).collect()
}

/// Who acts: `api` or `console`.
#[derive(Debug, Clone, Copy)]
pub struct Admin<'a> {
    /// The application.
    pub app: &'a App,
    /// Audit actor.
    pub actor: &'static str,
}

/// An identity just created, with its generated password (shown once).
#[derive(Debug)]
pub struct Created {
    /// The stored identity.
    pub record: IdentityRecord,
    /// The generated password, when asked for.
    pub password: Option<Secret>,
}

/// An invitation just issued for one identity.
#[derive(Debug)]
pub struct Invited {
    /// The invitation, with its link and code (shown once).
    pub issued: invite::IssuedInvitation,
    /// The identity was created for it.
    pub created: bool,
    /// A generated local password (shown once).
    pub password: Option<Secret>,
}

/// Who to invite.
#[derive(Debug, Clone)]
pub struct InviteTarget {
    /// Identity name.
    pub name: String,
    /// Mailbox: creates the identity when unknown, or sets the mailbox of
    /// a forgotten one.
    pub mailbox: Option<String>,
    /// Local password (for a new identity, or to replace the current one).
    pub password: Option<PasswordChoice>,
    /// Tenant of a new identity (default `default`).
    pub tenant: Option<String>,
}

impl Admin<'_> {
    async fn audit(
        &self,
        action: &str,
        identity: Option<&str>,
        outcome: &str,
        detail: Option<&str>,
    ) {
        let identity = identity.map(audit_name);
        let entry = NewAudit {
            actor: self.actor,
            action,
            identity: identity.as_deref(),
            outcome,
            detail,
        };
        if let Err(e) = self.app.store.audit(&entry).await {
            tracing::warn!(error = %e, action, "cannot write the audit log");
        }
    }

    /// Audits `result` of `action` on `identity` (errors by their code).
    async fn audited<T>(
        &self,
        action: &str,
        identity: Option<&str>,
        result: Result<T, AdminError>,
    ) -> Result<T, AdminError> {
        match &result {
            Ok(_) => self.audit(action, identity, "ok", None).await,
            Err(e) => {
                if let AdminError::Store(s) = e {
                    tracing::warn!(error = %s, action, "admin action failed");
                }
                if let AdminError::Internal(s) = e {
                    tracing::warn!(error = %s, action, "admin action failed");
                }
                self.audit(action, identity, e.outcome(), Some(e.code()))
                    .await
            }
        }
        result
    }

    /// Records a console sign-in attempt.
    pub async fn audit_signin(&self, how: &str, ok: bool) {
        let outcome = if ok { "ok" } else { "refused" };
        self.audit("admin.signin", None, outcome, Some(how)).await;
    }

    async fn reload(&self) {
        if let Err(e) = self.app.reload().await {
            tracing::warn!(error = %e, "cannot reload identities after an admin change");
        }
    }

    async fn hash(&self, choice: &PasswordChoice) -> Result<(String, Option<Secret>), AdminError> {
        let (password, shown) = match choice {
            PasswordChoice::Given(p) => (p.clone(), None),
            PasswordChoice::Generate => {
                let p = generate_password();
                (p.clone(), Some(p))
            }
            PasswordChoice::Later => (generate_password(), None),
        };
        let auth = self.app.config.auth.clone();
        let hash = tokio::task::spawn_blocking(move || {
            crate::identity::hash_password(password.expose(), &auth)
        })
        .await
        .map_err(|e| AdminError::Internal(e.to_string()))?
        .map_err(AdminError::Internal)?;
        Ok((hash, shown))
    }

    /// Checks a new identity's name and mailbox against the rules and the
    /// existing names; returns them normalised.
    async fn check_new(&self, name: &str, mailbox: &str) -> Result<(String, String), AdminError> {
        let name = names::validate_name(name).map_err(AdminError::InvalidName)?;
        let mailbox = names::validate_mailbox(mailbox).map_err(AdminError::InvalidMailbox)?;
        let key = names::same_name_key(&name);
        if let Some(existing) = self
            .app
            .store
            .list()
            .await?
            .into_iter()
            .find(|r| names::same_name_key(&r.name) == key)
        {
            return Err(AdminError::AlreadyExists(existing.name));
        }
        Ok((name, mailbox))
    }

    async fn create_unaudited(
        &self,
        name: &str,
        mailbox: &str,
        password: &PasswordChoice,
        tenant: Option<&str>,
        mode: Mode,
    ) -> Result<Created, AdminError> {
        password.check()?;
        let tenant = tenant
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .unwrap_or(DEFAULT_TENANT);
        self.app
            .config
            .check_identity_tenant(tenant, mode)
            .map_err(AdminError::Invalid)?;
        let (name, mailbox) = self.check_new(name, mailbox).await?;
        let (hash, shown) = self.hash(password).await?;
        let new = NewIdentity {
            name,
            mailbox,
            password_hash: hash,
            tenant: tenant.to_owned(),
            mode,
        };
        let record = match self.app.store.create(&new).await {
            Err(StoreError::AlreadyExists(n)) => return Err(AdminError::AlreadyExists(n)),
            other => other?,
        };
        Ok(Created {
            record,
            password: shown,
        })
    }

    /// Creates a `pending` identity.
    pub async fn create(
        &self,
        name: &str,
        mailbox: &str,
        password: PasswordChoice,
        tenant: Option<&str>,
        mode: Mode,
    ) -> Result<Created, AdminError> {
        let r = self
            .create_unaudited(name, mailbox, &password, tenant, mode)
            .await;
        let r = self.audited("identity.create", Some(name), r).await;
        self.reload().await;
        r
    }

    /// Replaces the local password; returns the generated one.
    pub async fn set_password(
        &self,
        name: &str,
        password: PasswordChoice,
    ) -> Result<Option<Secret>, AdminError> {
        let r = async {
            if matches!(password, PasswordChoice::Later) {
                return Err(AdminError::Invalid(
                    "give `password` or `generate: true`".into(),
                ));
            }
            password.check()?;
            let rec = get(self.app, name).await?;
            let (hash, shown) = self.hash(&password).await?;
            self.app.store.set_password(&rec.name, &hash).await?;
            Ok(shown)
        }
        .await;
        let r = self.audited("identity.set_password", Some(name), r).await;
        self.reload().await;
        r
    }

    /// Deletes an identity with its token and personal data.
    pub async fn remove(&self, name: &str) -> Result<(), AdminError> {
        let r = async {
            let rec = get(self.app, name).await?;
            match self.app.store.remove(&rec.name).await {
                Err(StoreError::NotFound(n)) => return Err(AdminError::NotFound(n)),
                other => other?,
            }
            self.app.tokens.forget(rec.id);
            self.app.metrics.forget_identity(&rec.name);
            Ok(rec.name)
        }
        .await;
        let r = self.audited("identity.remove", Some(name), r).await;
        self.reload().await;
        r.map(|_| ())
    }

    /// Deletes an identity's registration data (refresh token, cached
    /// access tokens, mailbox, account, validations, invitations); the name
    /// and local password stay, status `pending`.
    pub async fn forget(&self, name: &str) -> Result<IdentityView, AdminError> {
        let r = async {
            let rec = get(self.app, name).await?;
            match self.app.store.forget(&rec.name).await {
                Err(StoreError::NotFound(n)) => return Err(AdminError::NotFound(n)),
                other => other?,
            }
            self.app.tokens.forget(rec.id);
            self.app.metrics.forget_identity(&rec.name);
            Ok(rec.name)
        }
        .await;
        let r = self.audited("identity.forget", Some(name), r).await;
        self.reload().await;
        identity_view(self.app, &r?).await
    }

    /// Creates identities from a CSV file (columns `name`, `mailbox`,
    /// `password` with `generate` or empty): all rows or, when one is
    /// wrong, none.
    pub async fn import_csv(&self, csv: &[u8]) -> Result<Vec<Imported>, AdminError> {
        let r = crate::onboarding::import::import(
            self.app.store.as_ref(),
            &self.app.config,
            csv,
            self.actor,
        )
        .await
        .map_err(|e| match e {
            ImportError::Store(s) => AdminError::Store(s),
            other => AdminError::Import(other),
        });
        let detail = match &r {
            Ok(list) => format!("{} identities imported", list.len()),
            Err(AdminError::Import(ImportError::Rows(rows))) => {
                format!("{} bad rows, nothing imported", rows.len())
            }
            Err(e) => e.code().to_owned(),
        };
        let outcome = match &r {
            Ok(_) => "ok",
            Err(e) => e.outcome(),
        };
        if let Err(AdminError::Store(e)) = &r {
            tracing::warn!(error = %e, "CSV import failed");
        }
        self.audit("identity.import", None, outcome, Some(&detail))
            .await;
        self.reload().await;
        r
    }

    /// Revokes the identity's pending invitations; returns how many.
    pub async fn revoke(&self, name: &str) -> Result<u64, AdminError> {
        let r = async {
            let rec = get(self.app, name).await?;
            Ok(self
                .app
                .store
                .revoke_invitations(rec.id, crate::store::now_unix())
                .await?)
        }
        .await;
        self.audited("invitation.revoke", Some(name), r).await
    }

    /// Invites every identity that is not linked (and has a mailbox).
    pub async fn invite_all_pending(&self) -> Result<Vec<Invited>, AdminError> {
        let targets: Vec<InviteTarget> = self
            .app
            .store
            .list()
            .await?
            .into_iter()
            .filter(|r| matches!(r.status, Status::Pending | Status::NeedsReauth))
            .filter(|r| r.mode == Mode::Delegated && !r.mailbox.trim().is_empty())
            .map(|r| InviteTarget {
                name: r.name,
                mailbox: None,
                password: None,
                tenant: None,
            })
            .collect();
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        self.invite(targets).await
    }

    /// Invites each target (revoking its older pending invitations),
    /// creating unknown identities that come with a mailbox. Every target
    /// is checked before anything is written.
    pub async fn invite(&self, targets: Vec<InviteTarget>) -> Result<Vec<Invited>, AdminError> {
        if targets.is_empty() {
            return Err(AdminError::Invalid("no identities to invite".into()));
        }
        if targets.len() > MAX_BATCH {
            return Err(AdminError::Invalid(format!(
                "at most {MAX_BATCH} identities per request"
            )));
        }
        // Check every target first: nothing is written when one is wrong.
        let mut plan = Vec::with_capacity(targets.len());
        let mut seen = std::collections::HashSet::new();
        for t in targets {
            let r = self.plan(&t, &mut seen).await;
            let existing = self.audited_err("invitation.create", &t.name, r).await?;
            plan.push((t, existing));
        }
        let mut out = Vec::with_capacity(plan.len());
        for (t, existing) in plan {
            let r = self.invite_one(&t, existing).await;
            let invited = self.audited_err("invitation.create", &t.name, r).await?;
            out.push(invited);
        }
        self.reload().await;
        Ok(out)
    }

    /// Audits only failures (a success is audited by the operation).
    async fn audited_err<T>(
        &self,
        action: &str,
        name: &str,
        r: Result<T, AdminError>,
    ) -> Result<T, AdminError> {
        if let Err(e) = &r {
            if let AdminError::Store(s) = e {
                tracing::warn!(error = %s, action, "admin action failed");
            }
            self.audit(action, Some(name), e.outcome(), Some(e.code()))
                .await;
        }
        r
    }

    async fn plan(
        &self,
        t: &InviteTarget,
        seen: &mut std::collections::HashSet<String>,
    ) -> Result<Option<IdentityRecord>, AdminError> {
        if let Some(p) = &t.password {
            p.check()?;
        }
        let existing = self.app.store.get(&t.name).await?;
        let key = match &existing {
            Some(r) => names::lookup_key(&r.name),
            None => names::lookup_key(&t.name),
        };
        if !seen.insert(key) {
            return Err(AdminError::Invalid(format!(
                "identity `{}` is named twice",
                t.name
            )));
        }
        if let Some(r) = existing.as_ref().filter(|r| r.mode == Mode::App) {
            return Err(AdminError::Invalid(format!(
                "identity `{}` is app-only: the tenant's app credential acts for its mailbox, nobody signs in, so there is nothing to invite to",
                r.name
            )));
        }
        if let (None, Some(tenant)) = (&existing, &t.tenant) {
            self.app
                .config
                .check_identity_tenant(tenant, Mode::Delegated)
                .map_err(AdminError::Invalid)?;
        }
        match (&existing, &t.mailbox) {
            (None, None) => Err(AdminError::NotFound(t.name.clone())),
            (None, Some(mailbox)) => {
                self.check_new(&t.name, mailbox).await?;
                Ok(None)
            }
            (Some(r), Some(mailbox)) => {
                let mailbox =
                    names::validate_mailbox(mailbox).map_err(AdminError::InvalidMailbox)?;
                if !r.mailbox.is_empty() && !r.mailbox.eq_ignore_ascii_case(&mailbox) {
                    return Err(AdminError::MailboxConflict(r.name.clone()));
                }
                Ok(existing)
            }
            (Some(r), None) if r.mailbox.trim().is_empty() => {
                Err(AdminError::NoMailbox(r.name.clone()))
            }
            (Some(_), None) => Ok(existing),
        }
    }

    async fn invite_one(
        &self,
        t: &InviteTarget,
        existing: Option<IdentityRecord>,
    ) -> Result<Invited, AdminError> {
        let (record, created, password) = match existing {
            Some(mut r) => {
                if let Some(mailbox) = &t.mailbox {
                    if r.mailbox.is_empty() {
                        let mailbox =
                            names::validate_mailbox(mailbox).map_err(AdminError::InvalidMailbox)?;
                        self.app.store.set_mailbox(&r.name, &mailbox).await?;
                        r.mailbox = mailbox;
                    }
                }
                let mut shown = None;
                if let Some(p) = t
                    .password
                    .as_ref()
                    .filter(|p| !matches!(p, PasswordChoice::Later))
                {
                    let (hash, s) = self.hash(p).await?;
                    self.app.store.set_password(&r.name, &hash).await?;
                    self.audit("identity.set_password", Some(&r.name), "ok", None)
                        .await;
                    shown = s;
                }
                (r, false, shown)
            }
            None => {
                let mailbox = t.mailbox.as_deref().unwrap_or_default();
                let password = t.password.clone().unwrap_or(PasswordChoice::Later);
                let c = self
                    .create_unaudited(
                        &t.name,
                        mailbox,
                        &password,
                        t.tenant.as_deref(),
                        Mode::Delegated,
                    )
                    .await?;
                self.audit("identity.create", Some(&c.record.name), "ok", None)
                    .await;
                (c.record, true, c.password)
            }
        };
        let issued = invite::issue(
            self.app.store.as_ref(),
            &self.app.config,
            &record,
            self.actor,
        )
        .await?;
        Ok(Invited {
            issued,
            created,
            password,
        })
    }
}

/// Proves identity `name` end to end on every enabled front end
/// ([`crate::validate`]), which stores and audits the results.
pub async fn validate(
    app: &std::sync::Arc<App>,
    actor: &'static str,
    name: &str,
) -> Result<Vec<ValidationView>, AdminError> {
    use crate::validate::ValidateError;
    let r = crate::validate::validate(app, name, actor)
        .await
        .map_err(|e| match e {
            ValidateError::NotFound(n) => AdminError::NotFound(n),
            ValidateError::Store(s) => AdminError::Store(s),
            ValidateError::Setup(s) => AdminError::Internal(s.to_string()),
        });
    match r {
        Ok(list) => Ok(list.iter().map(ValidationView::from).collect()),
        Err(e) => Admin {
            app: app.as_ref(),
            actor,
        }
        .audited_err("identity.validate", name, Err::<(), _>(e))
        .await
        .map(|_| Vec::new()),
    }
}

/// Every invitation, newest first, optionally for one identity.
pub async fn invitations(
    app: &App,
    identity: Option<&str>,
) -> Result<Vec<InvitationRecord>, AdminError> {
    let all = app.store.list_invitations().await?;
    Ok(match identity {
        None => all,
        Some(name) => {
            let key = names::lookup_key(name);
            all.into_iter()
                .filter(|i| names::lookup_key(&i.identity) == key)
                .collect()
        }
    })
}

/// Audit entries, newest first.
pub async fn audit_log(
    app: &App,
    identity: Option<&str>,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<AuditEntry>, AdminError> {
    Ok(app
        .store
        .audit_log(identity, before, limit.clamp(1, 500))
        .await?)
}
