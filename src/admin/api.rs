//! The JSON API under `/api/v1`: identities, invitations and the audit log,
//! with errors as `{"code", "message"}` and an OpenAPI document generated
//! from these handlers by utoipa (served at `/api/v1/openapi.json`).
//!
//! Routing is one table ([`ROUTES`]): a new endpoint is a table row, a
//! [`Route`] variant, a handler with `#[utoipa::path]`, and its name in
//! [`ApiDoc`]. A test checks that the document lists every row.

use super::ops::{
    self, Admin, AdminError, IdentityView, InviteTarget, PasswordChoice, StatusFilter,
};
use super::web::{self, BodyError};
use crate::app::App;
use crate::onboarding::import::ImportError;
use crate::proxy::http::full;
use crate::secret::Secret;
use crate::store::{AuditEntry, InvitationRecord};
use crate::tls::OutBody;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa::{IntoParams, OpenApi, ToSchema};

/// An error answer: a stable code and human words.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ApiError {
    /// Stable snake_case code (`unauthorized`, `not_found`, ...).
    pub code: &'static str,
    /// What went wrong, in plain words (never a secret).
    pub message: String,
    /// For `invalid_rows`: each bad row of a CSV import.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows: Option<Vec<RowProblem>>,
    #[serde(skip)]
    status: StatusCode,
}

/// A CSV row that cannot be imported.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RowProblem {
    /// Line number in the file (1 is the header).
    pub line: u64,
    /// What is wrong.
    pub message: String,
}

impl ApiError {
    /// An error with its HTTP status.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            rows: None,
            status,
        }
    }

    /// The JSON answer.
    pub fn response(&self) -> Response<OutBody> {
        let mut r = json(self.status, self);
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"authswap admin\""),
            );
        }
        r
    }
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        let mut api = ApiError::new(e.status(), e.code(), e.to_string());
        if let AdminError::Import(ImportError::Rows(rows)) = &e {
            api.message = format!(
                "{} row(s) cannot be imported; nothing was imported",
                rows.len()
            );
            api.rows = Some(
                rows.iter()
                    .map(|r| RowProblem {
                        line: r.line,
                        message: r.message.clone(),
                    })
                    .collect(),
            );
        }
        api
    }
}

impl From<BodyError> for ApiError {
    fn from(e: BodyError) -> Self {
        match e {
            BodyError::TooLarge(_) => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                e.to_string(),
            ),
            BodyError::Timeout | BodyError::Read => {
                ApiError::new(StatusCode::BAD_REQUEST, "body_unreadable", e.to_string())
            }
        }
    }
}

/// A JSON response.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<OutBody> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(full(Bytes::from(body)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The API's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET /api/v1/identities`
    ListIdentities,
    /// `POST /api/v1/identities`
    CreateIdentity,
    /// `POST /api/v1/identities/import`
    Import,
    /// `GET /api/v1/identities/{name}`
    ShowIdentity,
    /// `DELETE /api/v1/identities/{name}`
    RemoveIdentity,
    /// `PUT /api/v1/identities/{name}/password`
    SetPassword,
    /// `POST /api/v1/identities/{name}/forget`
    Forget,
    /// `POST /api/v1/identities/{name}/validate`
    Validate,
    /// `POST /api/v1/identities/{name}/invitations/revoke`
    RevokeInvitations,
    /// `POST /api/v1/identities/{name}/invitations/resend`
    ResendInvitation,
    /// `POST /api/v1/invitations`
    CreateInvitations,
    /// `GET /api/v1/invitations`
    ListInvitations,
    /// `GET /api/v1/audit`
    Audit,
    /// `GET /api/v1/openapi.json`
    OpenApiDoc,
    /// `POST /api/v1/reload`
    Reload,
}

/// Method, path pattern and endpoint of every API route, in match order.
pub const ROUTES: &[(&str, &str, Route)] = &[
    ("GET", "/api/v1/identities", Route::ListIdentities),
    ("POST", "/api/v1/identities", Route::CreateIdentity),
    ("POST", "/api/v1/identities/import", Route::Import),
    ("GET", "/api/v1/identities/{name}", Route::ShowIdentity),
    ("DELETE", "/api/v1/identities/{name}", Route::RemoveIdentity),
    (
        "PUT",
        "/api/v1/identities/{name}/password",
        Route::SetPassword,
    ),
    ("POST", "/api/v1/identities/{name}/forget", Route::Forget),
    (
        "POST",
        "/api/v1/identities/{name}/validate",
        Route::Validate,
    ),
    (
        "POST",
        "/api/v1/identities/{name}/invitations/revoke",
        Route::RevokeInvitations,
    ),
    (
        "POST",
        "/api/v1/identities/{name}/invitations/resend",
        Route::ResendInvitation,
    ),
    ("POST", "/api/v1/invitations", Route::CreateInvitations),
    ("GET", "/api/v1/invitations", Route::ListInvitations),
    ("GET", "/api/v1/audit", Route::Audit),
    ("GET", "/api/v1/openapi.json", Route::OpenApiDoc),
    ("POST", "/api/v1/reload", Route::Reload),
];

/// One API call, authenticated.
pub struct Call<'a> {
    app: &'a Arc<App>,
    params: Vec<String>,
    query: Vec<(String, String)>,
    body: Bytes,
}

impl Call<'_> {
    fn admin(&self) -> Admin<'_> {
        Admin {
            app: self.app,
            actor: "api",
        }
    }

    fn name(&self) -> &str {
        self.params.first().map(String::as_str).unwrap_or_default()
    }

    fn query(&self, key: &str) -> Option<&str> {
        web::field(&self.query, key)
    }

    fn json<T: for<'de> Deserialize<'de>>(&self) -> Result<T, ApiError> {
        let body: &[u8] = if self.body.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &self.body
        };
        serde_json::from_slice(body).map_err(|e| {
            use serde_json::error::Category;
            match e.classify() {
                Category::Data => {
                    // Messages about wrong values may quote them (a
                    // password): say where instead.
                    let text = e.to_string();
                    let message = if text.contains("invalid type") || text.contains("invalid value")
                    {
                        format!(
                            "a field has the wrong type or value (line {}, column {})",
                            e.line(),
                            e.column()
                        )
                    } else {
                        text
                    };
                    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
                }
                _ => ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_json",
                    format!(
                        "the body is not valid JSON (line {}, column {})",
                        e.line(),
                        e.column()
                    ),
                ),
            }
        })
    }
}

/// Finds the route of `method` `path`: `Err(allowed methods)` when the path
/// exists with other methods, `Ok(None)` when it does not exist.
pub fn resolve(
    method: &Method,
    path: &str,
) -> Result<Option<(Route, Vec<String>)>, Vec<&'static str>> {
    let mut allowed = Vec::new();
    for (m, pattern, route) in ROUTES {
        if let Some(params) = web::match_path(pattern, path) {
            if method.as_str() == *m || (method == Method::HEAD && *m == "GET") {
                return Ok(Some((*route, params)));
            }
            allowed.push(*m);
        }
    }
    if allowed.is_empty() {
        Ok(None)
    } else {
        Err(allowed)
    }
}

/// Largest body a route accepts.
pub fn body_limit(route: Route) -> usize {
    match route {
        Route::Import => web::IMPORT_LIMIT,
        _ => web::BODY_LIMIT,
    }
}

/// Serves one authenticated API call.
pub async fn serve(
    app: &Arc<App>,
    route: Route,
    params: Vec<String>,
    headers: &HeaderMap,
    query: &str,
    body: Bytes,
) -> Response<OutBody> {
    let mime = match route {
        Route::Import => "text/csv",
        _ => "application/json",
    };
    if !body.is_empty() && !web::content_type_is(headers, mime) {
        return ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("send the body as {mime}"),
        )
        .response();
    }
    let call = Call {
        app,
        params,
        query: web::form_pairs(query.as_bytes()),
        body,
    };
    let result = match route {
        Route::ListIdentities => list_identities(&call).await,
        Route::CreateIdentity => create_identity(&call).await,
        Route::Import => import_identities(&call).await,
        Route::ShowIdentity => show_identity(&call).await,
        Route::RemoveIdentity => remove_identity(&call).await,
        Route::SetPassword => set_password(&call).await,
        Route::Forget => forget_identity(&call).await,
        Route::Validate => validate_identity(&call).await,
        Route::RevokeInvitations => revoke_invitations(&call).await,
        Route::ResendInvitation => resend_invitation(&call).await,
        Route::CreateInvitations => create_invitations(&call).await,
        Route::ListInvitations => list_invitations(&call).await,
        Route::Audit => audit_log(&call).await,
        Route::OpenApiDoc => Ok(json(StatusCode::OK, &ApiDoc::openapi())),
        Route::Reload => reload_config(&call).await,
    };
    result.unwrap_or_else(|e| e.response())
}

type Reply = Result<Response<OutBody>, ApiError>;

/// Query of `GET /api/v1/identities`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct ListQuery {
    /// `all` (default), `ok` (linked and working) or `error` (needing attention).
    status: Option<StatusFilter>,
    /// Case-insensitive search in name, mailbox, status and account.
    q: Option<String>,
}

/// A list of identities.
#[derive(Debug, Serialize, ToSchema)]
pub struct IdentityList {
    /// The identities, by name.
    pub identities: Vec<IdentityView>,
}

/// List identities, filtered by status and a search string.
#[utoipa::path(get, path = "/api/v1/identities", tag = "identities", params(ListQuery),
    responses((status = 200, body = IdentityList), (status = 401, body = ApiError), (status = 422, body = ApiError)))]
async fn list_identities(call: &Call<'_>) -> Reply {
    let filter = match StatusFilter::parse(call.query("status").unwrap_or("")) {
        Some(f) => f,
        None => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_filter",
                "status must be all, ok or error",
            ))
        }
    };
    let identities = ops::identity_views(call.app, filter, call.query("q").unwrap_or("")).await?;
    Ok(json(StatusCode::OK, &IdentityList { identities }))
}

/// Body of `POST /api/v1/identities`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateIdentity {
    /// Name the legacy client sends (case-insensitive).
    pub name: String,
    /// Upstream mailbox (UPN).
    pub mailbox: String,
    /// Local password; leave out (with `generate` false) to set it later.
    #[schema(value_type = Option<String>)]
    pub password: Option<Secret>,
    /// Generate a local password and return it once.
    #[serde(default)]
    pub generate: bool,
    /// Configured tenant (default `default`, the `[identity_provider]`).
    #[serde(default)]
    pub tenant: Option<String>,
    /// `delegated` (default: a person consents) or `app` (app-only: the
    /// tenant's app credential acts for the mailbox).
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub mode: Option<crate::store::Mode>,
}

/// An identity just created.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedIdentity {
    /// The identity.
    pub identity: IdentityView,
    /// The generated local password, shown this once.
    pub password: Option<String>,
}

/// Create a pending identity.
#[utoipa::path(post, path = "/api/v1/identities", tag = "identities", request_body = CreateIdentity,
    responses((status = 201, body = CreatedIdentity), (status = 401, body = ApiError),
        (status = 409, body = ApiError), (status = 422, body = ApiError)))]
async fn create_identity(call: &Call<'_>) -> Reply {
    let req: CreateIdentity = call.json()?;
    let choice = PasswordChoice::from_fields(req.password, req.generate)?;
    let created = call
        .admin()
        .create(
            &req.name,
            &req.mailbox,
            choice,
            req.tenant.as_deref(),
            req.mode.unwrap_or_default(),
        )
        .await?;
    let identity = ops::identity_view(call.app, &created.record.name).await?;
    Ok(json(
        StatusCode::CREATED,
        &CreatedIdentity {
            identity,
            password: created.password.map(|p| p.expose().to_owned()),
        },
    ))
}

/// An identity created by a CSV import.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImportedView {
    /// Identity name.
    pub name: String,
    /// Mailbox.
    pub mailbox: String,
    /// The generated local password (rows with `generate`), shown this once.
    pub password: Option<String>,
}

/// The identities a CSV import created.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImportedList {
    /// In file order.
    pub imported: Vec<ImportedView>,
}

/// Create identities from CSV (`text/csv`, at most 1 MiB): a header row
/// naming `name`, `mailbox` and optionally `password` (a password,
/// `generate`, or empty for none yet). A file with a bad row imports
/// nothing; the answer lists every bad row with its line number.
#[utoipa::path(post, path = "/api/v1/identities/import", tag = "identities",
    request_body(content = String, content_type = "text/csv", description = "name,mailbox,password"),
    responses((status = 201, body = ImportedList), (status = 401, body = ApiError),
        (status = 413, body = ApiError), (status = 415, body = ApiError), (status = 422, body = ApiError)))]
async fn import_identities(call: &Call<'_>) -> Reply {
    let list = call.admin().import_csv(&call.body).await?;
    let imported = list
        .into_iter()
        .map(|i| ImportedView {
            name: i.record.name.clone(),
            mailbox: i.record.mailbox.clone(),
            password: i.generated_password.map(|p| p.expose().to_owned()),
        })
        .collect();
    Ok(json(StatusCode::CREATED, &ImportedList { imported }))
}

/// Show one identity.
#[utoipa::path(get, path = "/api/v1/identities/{name}", tag = "identities",
    params(("name" = String, Path, description = "Identity name")),
    responses((status = 200, body = IdentityView), (status = 401, body = ApiError), (status = 404, body = ApiError)))]
async fn show_identity(call: &Call<'_>) -> Reply {
    let view = ops::identity_view(call.app, call.name()).await?;
    Ok(json(StatusCode::OK, &view))
}

/// Delete an identity with its refresh token and personal data.
#[utoipa::path(delete, path = "/api/v1/identities/{name}", tag = "identities",
    params(("name" = String, Path, description = "Identity name")),
    responses((status = 204, description = "Removed"), (status = 401, body = ApiError), (status = 404, body = ApiError)))]
async fn remove_identity(call: &Call<'_>) -> Reply {
    call.admin().remove(call.name()).await?;
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    Ok(r)
}

/// Body of `PUT /api/v1/identities/{name}/password`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetPassword {
    /// The new local password.
    #[schema(value_type = Option<String>)]
    pub password: Option<Secret>,
    /// Generate one and return it once.
    #[serde(default)]
    pub generate: bool,
}

/// A changed password.
#[derive(Debug, Serialize, ToSchema)]
pub struct PasswordChanged {
    /// The identity.
    pub identity: String,
    /// The generated local password, shown this once.
    pub password: Option<String>,
}

/// Replace an identity's local password.
#[utoipa::path(put, path = "/api/v1/identities/{name}/password", tag = "identities",
    params(("name" = String, Path, description = "Identity name")), request_body = SetPassword,
    responses((status = 200, body = PasswordChanged), (status = 401, body = ApiError),
        (status = 404, body = ApiError), (status = 422, body = ApiError)))]
async fn set_password(call: &Call<'_>) -> Reply {
    let req: SetPassword = call.json()?;
    let choice = PasswordChoice::from_fields(req.password, req.generate)?;
    let shown = call.admin().set_password(call.name(), choice).await?;
    let rec = ops::identity_view(call.app, call.name()).await?;
    Ok(json(
        StatusCode::OK,
        &PasswordChanged {
            identity: rec.name,
            password: shown.map(|p| p.expose().to_owned()),
        },
    ))
}

/// Delete an identity's registration data: refresh token, cached access
/// tokens, mailbox, account, validations and invitations. The name and
/// local password stay; the identity is `pending` again.
#[utoipa::path(post, path = "/api/v1/identities/{name}/forget", tag = "identities",
    params(("name" = String, Path, description = "Identity name")),
    responses((status = 200, body = IdentityView), (status = 401, body = ApiError), (status = 404, body = ApiError)))]
async fn forget_identity(call: &Call<'_>) -> Reply {
    let view = call.admin().forget(call.name()).await?;
    Ok(json(StatusCode::OK, &view))
}

/// Results of validating an identity.
#[derive(Debug, Serialize, ToSchema)]
pub struct Validated {
    /// The identity.
    pub identity: String,
    /// One result per enabled front end.
    pub results: Vec<ops::ValidationView>,
}

/// Prove an identity end to end: for each enabled front end, get an
/// access token and use it upstream (EWS `GetFolder`, SMTP `AUTH`, IMAP
/// `AUTHENTICATE`, POP3 `AUTH`); the results are stored and shown in the
/// identity's `validations`. A failing protocol is a result with
/// `ok: false`, not an error.
#[utoipa::path(post, path = "/api/v1/identities/{name}/validate", tag = "identities",
    params(("name" = String, Path, description = "Identity name")),
    responses((status = 200, body = Validated), (status = 401, body = ApiError), (status = 404, body = ApiError)))]
async fn validate_identity(call: &Call<'_>) -> Reply {
    let results = ops::validate(call.app, "api", call.name()).await?;
    let identity = ops::identity_view(call.app, call.name()).await?.name;
    Ok(json(StatusCode::OK, &Validated { identity, results }))
}

/// Revoked invitations.
#[derive(Debug, Serialize, ToSchema)]
pub struct Revoked {
    /// The identity.
    pub identity: String,
    /// How many pending invitations were revoked.
    pub revoked: u64,
}

/// Revoke an identity's pending invitations.
#[utoipa::path(post, path = "/api/v1/identities/{name}/invitations/revoke", tag = "invitations",
    params(("name" = String, Path, description = "Identity name")),
    responses((status = 200, body = Revoked), (status = 401, body = ApiError), (status = 404, body = ApiError)))]
async fn revoke_invitations(call: &Call<'_>) -> Reply {
    let revoked = call.admin().revoke(call.name()).await?;
    let name = ops::identity_view(call.app, call.name()).await?.name;
    Ok(json(
        StatusCode::OK,
        &Revoked {
            identity: name,
            revoked,
        },
    ))
}

/// An invitation just issued: its link and code are shown this once.
#[derive(Debug, Serialize, ToSchema)]
pub struct IssuedView {
    /// The invited identity.
    pub identity: String,
    /// Its mailbox.
    pub mailbox: String,
    /// The link to send the user.
    pub url: String,
    /// The short code (for the start page).
    pub code: String,
    /// When it expires (RFC 3339).
    pub expires_at: String,
    /// The identity was created for this invitation.
    pub created_identity: bool,
    /// A generated local password, shown this once.
    pub password: Option<String>,
}

/// Invitations just issued.
#[derive(Debug, Serialize, ToSchema)]
pub struct IssuedList {
    /// One per identity.
    pub invitations: Vec<IssuedView>,
}

fn issued(list: Vec<ops::Invited>) -> IssuedList {
    IssuedList {
        invitations: list
            .into_iter()
            .map(|i| IssuedView {
                identity: i.issued.record.identity.clone(),
                mailbox: i.issued.record.mailbox.clone(),
                url: i.issued.url.expose().to_owned(),
                code: i.issued.code.expose().to_owned(),
                expires_at: ops::rfc3339(i.issued.record.expires_at),
                created_identity: i.created,
                password: i.password.map(|p| p.expose().to_owned()),
            })
            .collect(),
    }
}

/// Re-invite an identity: a new invitation, older pending ones revoked.
#[utoipa::path(post, path = "/api/v1/identities/{name}/invitations/resend", tag = "invitations",
    params(("name" = String, Path, description = "Identity name")),
    responses((status = 201, body = IssuedList), (status = 401, body = ApiError),
        (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn resend_invitation(call: &Call<'_>) -> Reply {
    let list = call
        .admin()
        .invite(vec![InviteTarget {
            name: call.name().to_owned(),
            mailbox: None,
            password: None,
            tenant: None,
        }])
        .await?;
    Ok(json(StatusCode::CREATED, &issued(list)))
}

/// Someone to invite: a name, or a name with a mailbox (creating the
/// identity when unknown) and optionally its local password.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Invitee {
    /// An existing identity.
    Name(String),
    /// An identity, created when unknown.
    Full(InviteeSpec),
}

/// An identity to invite, created when unknown.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InviteeSpec {
    /// Identity name.
    pub name: String,
    /// Mailbox (needed to create the identity).
    pub mailbox: Option<String>,
    /// Local password to set.
    #[schema(value_type = Option<String>)]
    pub password: Option<Secret>,
    /// Generate a local password and return it once.
    #[serde(default)]
    pub generate: bool,
    /// Tenant of a new identity (default `default`).
    #[serde(default)]
    pub tenant: Option<String>,
}

/// Body of `POST /api/v1/invitations`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateInvitations {
    /// Whom to invite.
    #[serde(default)]
    pub identities: Vec<Invitee>,
    /// Invite every identity that is not linked (pending or needing re-authentication).
    #[serde(default)]
    pub all_pending: bool,
}

/// Invite one or many identities (or every one not linked).
#[utoipa::path(post, path = "/api/v1/invitations", tag = "invitations", request_body = CreateInvitations,
    responses((status = 201, body = IssuedList), (status = 401, body = ApiError),
        (status = 404, body = ApiError), (status = 409, body = ApiError), (status = 422, body = ApiError)))]
async fn create_invitations(call: &Call<'_>) -> Reply {
    let req: CreateInvitations = call.json()?;
    let admin = call.admin();
    let list = match (req.all_pending, req.identities.is_empty()) {
        (true, true) => admin.invite_all_pending().await?,
        (false, false) => {
            let mut targets = Vec::with_capacity(req.identities.len());
            for i in req.identities {
                targets.push(match i {
                    Invitee::Name(name) => InviteTarget {
                        name,
                        mailbox: None,
                        password: None,
                        tenant: None,
                    },
                    Invitee::Full(s) => {
                        let choice = PasswordChoice::from_fields(s.password, s.generate)?;
                        InviteTarget {
                            name: s.name,
                            mailbox: s.mailbox,
                            password: Some(choice),
                            tenant: s.tenant,
                        }
                    }
                });
            }
            admin.invite(targets).await?
        }
        _ => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                "give either `identities` or `all_pending: true`",
            ))
        }
    };
    Ok(json(StatusCode::CREATED, &issued(list)))
}

/// An invitation as stored (no link, no code).
#[derive(Debug, Serialize, ToSchema)]
pub struct InvitationView {
    /// Id.
    pub id: i64,
    /// Invited identity.
    pub identity: String,
    /// Its mailbox.
    pub mailbox: String,
    /// `pending`, `completed`, `expired` or `revoked`.
    pub state: String,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub expires_at: String,
    /// When it was completed or revoked (RFC 3339).
    pub finished_at: Option<String>,
    /// Who created it.
    pub actor: String,
}

impl From<&InvitationRecord> for InvitationView {
    fn from(i: &InvitationRecord) -> Self {
        InvitationView {
            id: i.id,
            identity: i.identity.clone(),
            mailbox: i.mailbox.clone(),
            state: i.state.as_str().to_owned(),
            created_at: ops::rfc3339(i.created_at),
            expires_at: ops::rfc3339(i.expires_at),
            finished_at: i.finished_at.map(ops::rfc3339),
            actor: i.actor.clone(),
        }
    }
}

/// Invitations.
#[derive(Debug, Serialize, ToSchema)]
pub struct InvitationList {
    /// Newest first.
    pub invitations: Vec<InvitationView>,
}

/// Query of `GET /api/v1/invitations`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct InvitationQuery {
    /// Only this identity's.
    identity: Option<String>,
    /// Only this state: `pending`, `completed`, `expired` or `revoked`.
    state: Option<String>,
}

/// List invitations, newest first.
#[utoipa::path(get, path = "/api/v1/invitations", tag = "invitations", params(InvitationQuery),
    responses((status = 200, body = InvitationList), (status = 401, body = ApiError)))]
async fn list_invitations(call: &Call<'_>) -> Reply {
    let state = call.query("state").filter(|s| !s.is_empty());
    let list = ops::invitations(call.app, call.query("identity").filter(|s| !s.is_empty())).await?;
    let invitations = list
        .iter()
        .filter(|i| state.is_none_or_eq(i.state.as_str()))
        .map(InvitationView::from)
        .collect();
    Ok(json(StatusCode::OK, &InvitationList { invitations }))
}

trait OptEq {
    fn is_none_or_eq(&self, v: &str) -> bool;
}

impl OptEq for Option<&str> {
    fn is_none_or_eq(&self, v: &str) -> bool {
        match self {
            None => true,
            Some(s) => *s == v,
        }
    }
}

/// An audit entry.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditView {
    /// Id (increasing; use as `before` to page).
    pub id: i64,
    /// RFC 3339.
    pub at: String,
    /// `api`, `console`, `cli`, `user`, `system`, ...
    pub actor: String,
    /// Dotted action name (`identity.create`, `invitation.create`, ...).
    pub action: String,
    /// Identity concerned.
    pub identity: Option<String>,
    /// `ok`, `refused`, `failed`, or a state name.
    pub outcome: String,
    /// Plain-words detail.
    pub detail: Option<String>,
}

impl From<&AuditEntry> for AuditView {
    fn from(e: &AuditEntry) -> Self {
        AuditView {
            id: e.id,
            at: ops::rfc3339(e.at),
            actor: e.actor.clone(),
            action: e.action.clone(),
            identity: e.identity.clone(),
            outcome: e.outcome.clone(),
            detail: e.detail.clone(),
        }
    }
}

/// A page of the audit log.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    /// Newest first.
    pub entries: Vec<AuditView>,
    /// `before` for the next (older) page, when there may be one.
    pub next_before: Option<i64>,
}

/// Query of `GET /api/v1/audit`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct AuditQuery {
    /// Only this identity's entries.
    identity: Option<String>,
    /// Entries with an id below this.
    before: Option<i64>,
    /// At most this many (1–500, default 100).
    limit: Option<i64>,
}

/// Read the audit log, newest first.
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit", params(AuditQuery),
    responses((status = 200, body = AuditPage), (status = 401, body = ApiError), (status = 422, body = ApiError)))]
async fn audit_log(call: &Call<'_>) -> Reply {
    let int = |key: &str| -> Result<Option<i64>, ApiError> {
        match call.query(key).filter(|s| !s.is_empty()) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_request",
                    format!("`{key}` must be an integer"),
                )
            }),
        }
    };
    let limit = int("limit")?.unwrap_or(100).clamp(1, 500);
    let before = int("before")?;
    let identity = call.query("identity").filter(|s| !s.is_empty());
    let entries = ops::audit_log(call.app, identity, before, limit).await?;
    let next_before = (entries.len() as i64 == limit)
        .then(|| entries.last().map(|e| e.id))
        .flatten();
    Ok(json(
        StatusCode::OK,
        &AuditPage {
            entries: entries.iter().map(AuditView::from).collect(),
            next_before,
        },
    ))
}

/// Re-read the configuration file and the environment, as `SIGHUP` does:
/// the answer lists the sections applied, those that need a restart (their
/// running values are kept) and the listener addresses. A configuration
/// that is invalid or cannot be applied is refused (409, the reason in
/// `message`) and the running one keeps serving.
#[utoipa::path(post, path = "/api/v1/reload", tag = "meta",
    responses((status = 200, body = crate::reload::ReloadReport), (status = 401, body = ApiError),
        (status = 409, body = ApiError), (status = 503, body = ApiError)))]
async fn reload_config(call: &Call<'_>) -> Reply {
    use crate::reload::ReloadError;
    let Some(reloader) = call.app.reloader.get() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "this server has no configuration file to reload",
        ));
    };
    match reloader.reload().await {
        Ok(report) => Ok(json(StatusCode::OK, &report)),
        Err(ReloadError::Unavailable) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            ReloadError::Unavailable.to_string(),
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "reload_refused",
            e.to_string(),
        )),
    }
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API"), (status = 401, body = ApiError)))]
#[allow(dead_code)]
fn openapi_doc() {}

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI document of the admin API.
#[derive(OpenApi)]
#[openapi(
    info(title = "authswap admin API", description = "Identities, invitations and the audit log of an authswap instance. Every call needs `Authorization: Bearer <admin token>`."),
    paths(list_identities, create_identity, import_identities, show_identity, remove_identity, set_password,
        forget_identity, validate_identity, revoke_invitations, resend_invitation, create_invitations,
        list_invitations, audit_log, reload_config, openapi_doc),
    components(schemas(ApiError, RowProblem, ImportedView, ImportedList, IdentityView, ops::AccountView, ops::ValidationView, ops::EwsOperationView, StatusFilter,
        IdentityList, Validated, CreateIdentity, CreatedIdentity, SetPassword, PasswordChanged, Revoked,
        IssuedView, IssuedList, Invitee, InviteeSpec, CreateInvitations, InvitationView,
        InvitationList, AuditView, AuditPage, crate::reload::ReloadReport)),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
pub struct ApiDoc;
