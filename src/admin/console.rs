//! The admin console: server-rendered pages (minijinja templates under
//! `templates/admin/`, compiled in, autoescaped), usable without
//! JavaScript. Sign-in with the admin token or a one-time link sets a
//! session cookie; every state-changing form carries the session's CSRF
//! token and must come from this origin. Pages read the store on every
//! request, so they always show the live state.

use super::api::{AuditView, InvitationView};
use super::credential::{self, NewSession};
use super::ops::{self, Admin, AdminError, InviteTarget, PasswordChoice, StatusFilter};
use super::web;
use super::AdminListener;
use crate::proxy::http::full;
use crate::secret::Secret;
use crate::store::Mode;
use crate::tls::OutBody;
use bytes::Bytes;
use http::{header, request::Parts, HeaderValue, Method, Response, StatusCode};
use minijinja::{context, Environment, Value};
use serde::Serialize;
use std::time::Duration;

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "authswap_admin";
/// Pause after a wrong token, so guessing is slow.
const WRONG_TOKEN_DELAY: Duration = Duration::from_millis(300);

/// The compiled templates.
pub struct Pages {
    env: Environment<'static>,
}

impl std::fmt::Debug for Pages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pages")
    }
}

impl Default for Pages {
    fn default() -> Self {
        Self::new()
    }
}

impl Pages {
    /// Compiles the templates (a broken template is a build-time mistake:
    /// the unit test renders every one).
    pub fn new() -> Pages {
        let mut env = Environment::new();
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::Html);
        env.add_filter("pathseg", |s: String| web::percent_encode(&s));
        env.add_filter("when", when);
        for (name, source) in [
            ("base.html", include_str!("../../templates/admin/base.html")),
            (
                "login.html",
                include_str!("../../templates/admin/login.html"),
            ),
            (
                "message.html",
                include_str!("../../templates/admin/message.html"),
            ),
            (
                "confirm.html",
                include_str!("../../templates/admin/confirm.html"),
            ),
            (
                "invited.html",
                include_str!("../../templates/admin/invited.html"),
            ),
            (
                "created.html",
                include_str!("../../templates/admin/created.html"),
            ),
            (
                "identities.html",
                include_str!("../../templates/admin/identities.html"),
            ),
            (
                "invitations.html",
                include_str!("../../templates/admin/invitations.html"),
            ),
            (
                "audit.html",
                include_str!("../../templates/admin/audit.html"),
            ),
            (
                "imported.html",
                include_str!("../../templates/admin/imported.html"),
            ),
        ] {
            env.add_template(name, source)
                .unwrap_or_else(|e| panic!("template {name}: {e}"));
        }
        Pages { env }
    }

    /// Renders `name` with `ctx` as an HTML response.
    fn render(&self, status: StatusCode, name: &str, ctx: Value) -> Response<OutBody> {
        match self.env.get_template(name).and_then(|t| t.render(ctx)) {
            Ok(html) => html_response(status, html),
            Err(e) => {
                tracing::warn!(template = name, error = %e, "cannot render an admin page");
                html_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "<!doctype html><title>Error</title><p>The page could not be rendered; see the server log.</p>".to_owned(),
                )
            }
        }
    }
}

/// RFC 3339 (`2026-12-02T14:24:30Z`) as people read it: `2026-12-02 14:24 UTC`.
fn when(t: String) -> String {
    match (t.get(..10), t.get(11..16)) {
        (Some(day), Some(time)) if t.ends_with('Z') => format!("{day} {time} UTC"),
        _ => t,
    }
}

fn html_response(status: StatusCode, html: String) -> Response<OutBody> {
    let mut r = Response::new(full(Bytes::from(html)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn redirect(to: &str) -> Response<OutBody> {
    let mut r = html_response(StatusCode::SEE_OTHER, String::new());
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// Only local paths (`/x`, not `//host` or `/\host`) may be redirect targets.
fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n.starts_with("/\\")
                && !n.chars().any(|c| c.is_control()) =>
        {
            n
        }
        _ => "/identities",
    }
}

/// The console's view of one request.
struct Page<'a> {
    admin: &'a AdminListener,
    csrf: Option<Secret>,
}

impl Page<'_> {
    fn ops(&self) -> Admin<'_> {
        Admin {
            app: &self.admin.app,
            actor: "console",
        }
    }

    fn render(&self, status: StatusCode, name: &str, nav: &str, extra: Value) -> Response<OutBody> {
        let base = context! {
            signed_in => self.csrf.is_some(),
            csrf => self.csrf.as_ref().map(|c| c.expose().to_owned()).unwrap_or_default(),
            nav => nav,
        };
        self.admin
            .pages
            .render(status, name, context! { ..extra, ..base })
    }

    fn message(
        &self,
        status: StatusCode,
        heading: &str,
        text: &str,
        back: &str,
    ) -> Response<OutBody> {
        self.render(
            status,
            "message.html",
            "",
            context! { heading, text, back, bad => !status.is_success() },
        )
    }

    fn error(&self, e: &AdminError) -> Response<OutBody> {
        self.message(
            e.status(),
            "That did not work",
            &e.to_string(),
            "/identities",
        )
    }
}

fn session_cookie(admin: &AdminListener, session: &NewSession) -> HeaderValue {
    let secure = if admin.secure { "; Secure" } else { "" };
    let value = format!(
        "{SESSION_COOKIE}={}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{secure}",
        session.id.expose(),
        admin.sessions.ttl().as_secs()
    );
    HeaderValue::from_str(&value).expect("cookie is ASCII")
}

fn clear_cookie(admin: &AdminListener) -> HeaderValue {
    let secure = if admin.secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0{secure}"
    ))
    .expect("cookie is ASCII")
}

fn signed_in(admin: &AdminListener, session: NewSession, to: &str) -> Response<OutBody> {
    let mut r = redirect(to);
    r.headers_mut()
        .insert(header::SET_COOKIE, session_cookie(admin, &session));
    r
}

/// Serves a console request (everything on the admin listener outside
/// `/api/`, `/metrics`, `/healthz` and `/readyz`).
pub async fn serve<B>(admin: &AdminListener, parts: Parts, body: B) -> Response<OutBody>
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let path = parts.uri.path().to_owned();
    let query = web::form_pairs(parts.uri.query().unwrap_or("").as_bytes());
    let session_id = web::cookie(&parts.headers, SESSION_COOKIE);
    let csrf = session_id.as_deref().and_then(|id| admin.sessions.csrf(id));
    let page = Page {
        admin,
        csrf: csrf.clone(),
    };
    let is_post = parts.method == Method::POST;
    if parts.method != Method::GET && parts.method != Method::HEAD && !is_post {
        let mut r = page.message(
            StatusCode::METHOD_NOT_ALLOWED,
            "Method not allowed",
            "The console takes GET and POST only.",
            "/identities",
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD, POST"));
        return r;
    }
    // Forms: bounded, and only from this origin.
    let form = if is_post {
        if !web::same_origin(&parts.headers, admin.secure) {
            return page.message(
                StatusCode::FORBIDDEN,
                "Refused",
                "This form was not sent from the authswap console.",
                "/identities",
            );
        }
        let limit = if path == "/identities/import" {
            web::IMPORT_LIMIT
        } else {
            web::BODY_LIMIT
        };
        match web::read_body(&parts.headers, body, limit).await {
            Ok(b) => web::form_pairs(&b),
            Err(e) => {
                let status = match e {
                    web::BodyError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
                    _ => StatusCode::BAD_REQUEST,
                };
                return page.message(status, "Refused", &e.to_string(), "/identities");
            }
        }
    } else {
        Vec::new()
    };

    // Sign-in pages work without a session.
    if path == "/login" {
        return match is_post {
            false if csrf.is_some() => redirect("/identities"),
            false => login_page(&page, StatusCode::OK, None),
            true => login(&page, &form).await,
        };
    }
    if let Some(params) = web::match_path("/login/once/{nonce}", &path) {
        if is_post {
            return page.message(
                StatusCode::METHOD_NOT_ALLOWED,
                "Not allowed",
                "Open the link instead.",
                "/login",
            );
        }
        let nonce = params.into_iter().next().unwrap_or_default();
        let ok = match credential::redeem_signin_link(admin.app.store.as_ref(), &nonce).await {
            Ok(ok) => ok,
            Err(e) => {
                tracing::warn!(error = %e, "cannot check a one-time sign-in link");
                false
            }
        };
        page.ops().audit_signin("one-time link", ok).await;
        if !ok {
            return login_page(
                &page,
                StatusCode::UNAUTHORIZED,
                Some("This sign-in link has expired or was already used. Run `authswap admin signin-link` for a new one, or sign in with the token."),
            );
        }
        let session = admin.sessions.create();
        return signed_in(admin, session, safe_next(web::field(&query, "next")));
    }

    // Unknown paths are 404 whether signed in or not.
    if !is_page(&path) {
        return page.message(
            StatusCode::NOT_FOUND,
            "Not found",
            "There is no such page.",
            "/identities",
        );
    }
    // Everything else needs a session; forms also its CSRF token.
    let Some(expected) = csrf.clone() else {
        if is_post {
            return page.message(
                StatusCode::FORBIDDEN,
                "Refused",
                "Your console session has ended: sign in again.",
                "/login",
            );
        }
        return redirect("/login");
    };
    if is_post {
        let sent = web::field(&form, "csrf").unwrap_or("");
        if !credential::secrets_equal(sent, expected.expose()) {
            return page.message(
                StatusCode::FORBIDDEN,
                "Refused",
                "This form is stale or was not sent from the console (missing or wrong CSRF token). Reload the page and try again.",
                "/identities",
            );
        }
    }

    if path == "/logout" && is_post {
        if let Some(id) = &session_id {
            admin.sessions.remove(id);
        }
        let mut r = redirect("/login");
        r.headers_mut()
            .insert(header::SET_COOKIE, clear_cookie(admin));
        return r;
    }
    if path == "/" && !is_post {
        return redirect("/identities");
    }
    if path == "/identities" {
        return match is_post {
            false => identities(&page, &query).await,
            true => create(&page, &form).await,
        };
    }
    if path == "/identities/import" && is_post {
        return import(&page, &form).await;
    }
    if path == "/invitations" && !is_post {
        return invitations(&page).await;
    }
    if path == "/invitations/all-pending" && is_post {
        return match page.ops().invite_all_pending().await {
            Ok(list) => invited(&page, list),
            Err(e) => page.error(&e),
        };
    }
    if path == "/audit" && !is_post {
        return audit(&page, &query).await;
    }
    if let Some(p) = web::match_path("/identities/{name}/{action}", &path) {
        let (name, action) = (p[0].as_str(), p[1].as_str());
        return identity_action(&page, name, action, is_post, &form).await;
    }
    page.message(
        StatusCode::NOT_FOUND,
        "Not found",
        "There is no such page.",
        "/identities",
    )
}

/// Whether `path` is a console page (other than the sign-in pages).
fn is_page(path: &str) -> bool {
    matches!(
        path,
        "/" | "/logout"
            | "/identities"
            | "/identities/import"
            | "/invitations"
            | "/invitations/all-pending"
            | "/audit"
    ) || web::match_path("/identities/{name}/{action}", path).is_some_and(|p| {
        matches!(
            p[1].as_str(),
            "invite" | "revoke" | "forget" | "remove" | "validate"
        )
    })
}

fn login_page(page: &Page<'_>, status: StatusCode, error: Option<&str>) -> Response<OutBody> {
    let token_file = page.admin.app.config.admin.token_file.display().to_string();
    page.render(status, "login.html", "", context! { error, token_file })
}

async fn login(page: &Page<'_>, form: &[(String, String)]) -> Response<OutBody> {
    let token = web::field(form, "token").unwrap_or("");
    let ok = !token.is_empty() && page.admin.credential.matches(token);
    page.ops().audit_signin("token", ok).await;
    if !ok {
        tokio::time::sleep(WRONG_TOKEN_DELAY).await;
        return login_page(
            page,
            StatusCode::UNAUTHORIZED,
            Some("That is not the admin token."),
        );
    }
    let session = page.admin.sessions.create();
    signed_in(page.admin, session, "/identities")
}

#[derive(Serialize)]
struct Shown {
    identity: String,
    mailbox: String,
    url: String,
    code: String,
    expires_at: String,
    password: Option<String>,
}

fn invited(page: &Page<'_>, list: Vec<ops::Invited>) -> Response<OutBody> {
    let invitations: Vec<Shown> = list
        .into_iter()
        .map(|i| Shown {
            identity: i.issued.record.identity.clone(),
            mailbox: i.issued.record.mailbox.clone(),
            url: i.issued.url.expose().to_owned(),
            code: i.issued.code.expose().to_owned(),
            expires_at: ops::rfc3339(i.issued.record.expires_at),
            password: i.password.map(|p| p.expose().to_owned()),
        })
        .collect();
    page.render(
        StatusCode::OK,
        "invited.html",
        "identities",
        context! { invitations },
    )
}

async fn identities(page: &Page<'_>, query: &[(String, String)]) -> Response<OutBody> {
    let filter = StatusFilter::parse(web::field(query, "status").unwrap_or("")).unwrap_or_default();
    let q = web::field(query, "q").unwrap_or("").trim().to_owned();
    match ops::identity_views(&page.admin.app, filter, &q).await {
        Ok(identities) => page.render(
            StatusCode::OK,
            "identities.html",
            "identities",
            context! {
                identities,
                filter => filter.as_str(),
                q,
                validate => true,
                tenants => page.admin.app.config.tenant_configs().iter().map(|t| t.0.to_owned()).collect::<Vec<_>>(),
                labels => context! {
                    linked => "Linked",
                    pending => "Pending",
                    needs_reauth => "Needs re-auth",
                    upstream_refused => "Upstream refused",
                    app_credential => "App credential refused",
                },
            },
        ),
        Err(e) => page.error(&e),
    }
}

async fn create(page: &Page<'_>, form: &[(String, String)]) -> Response<OutBody> {
    let name = web::field(form, "name").unwrap_or("").trim();
    let mailbox = web::field(form, "mailbox").unwrap_or("").trim();
    let password = web::field(form, "password")
        .filter(|p| !p.is_empty())
        .map(Secret::new);
    let generate = web::field(form, "generate").is_some();
    let tenant = web::field(form, "tenant")
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let mode = match web::field(form, "mode")
        .map(str::trim)
        .filter(|m| !m.is_empty())
    {
        None => Mode::Delegated,
        Some(m) => match Mode::parse(m) {
            Some(m) => m,
            None => return page.error(&AdminError::Invalid(format!("`{m}` is not a mode"))),
        },
    };
    let choice = match PasswordChoice::from_fields(password, generate) {
        Ok(c) => c,
        Err(e) => return page.error(&e),
    };
    if web::field(form, "then") == Some("invite") && mode == Mode::Delegated {
        let target = InviteTarget {
            name: name.to_owned(),
            mailbox: Some(mailbox.to_owned()),
            password: Some(choice),
            tenant: tenant.map(str::to_owned),
        };
        // An existing name is refused rather than silently re-invited.
        if let Ok(Some(r)) = page.admin.app.store.get(name).await {
            return page.error(&AdminError::AlreadyExists(r.name));
        }
        return match page.ops().invite(vec![target]).await {
            Ok(list) => invited(page, list),
            Err(e) => page.error(&e),
        };
    }
    match page.ops().create(name, mailbox, choice, tenant, mode).await {
        Ok(c) => page.render(
            StatusCode::OK,
            "created.html",
            "identities",
            context! {
                heading => format!("Identity {} added", c.record.name),
                text => match c.record.mode {
                    Mode::Delegated => "It is pending: invite the user to sign in with Microsoft to link it.",
                    Mode::App => "It is app-only: the tenant's app credential acts for its mailbox, nobody signs in. Validate it to check the permissions.",
                },
                password => c.password.map(|p| p.expose().to_owned()),
            },
        ),
        Err(e) => page.error(&e),
    }
}

#[derive(Serialize)]
struct ImportedRow {
    name: String,
    mailbox: String,
    password: Option<String>,
}

async fn import(page: &Page<'_>, form: &[(String, String)]) -> Response<OutBody> {
    let csv = web::field(form, "csv").unwrap_or("");
    match page.ops().import_csv(csv.as_bytes()).await {
        Ok(list) => {
            let imported: Vec<ImportedRow> = list
                .into_iter()
                .map(|i| ImportedRow {
                    name: i.record.name.clone(),
                    mailbox: i.record.mailbox.clone(),
                    password: i.generated_password.map(|p| p.expose().to_owned()),
                })
                .collect();
            page.render(
                StatusCode::OK,
                "imported.html",
                "identities",
                context! { imported },
            )
        }
        Err(AdminError::Import(crate::onboarding::import::ImportError::Rows(rows))) => page.render(
            StatusCode::UNPROCESSABLE_ENTITY,
            "imported.html",
            "identities",
            context! {
                rows,
                text => "Fix these rows and import the whole file again.",
            },
        ),
        Err(e) => page.error(&e),
    }
}

async fn invitations(page: &Page<'_>) -> Response<OutBody> {
    match ops::invitations(&page.admin.app, None).await {
        Ok(list) => {
            let invitations: Vec<InvitationView> = list.iter().map(InvitationView::from).collect();
            page.render(
                StatusCode::OK,
                "invitations.html",
                "invitations",
                context! { invitations },
            )
        }
        Err(e) => page.error(&e),
    }
}

async fn audit(page: &Page<'_>, query: &[(String, String)]) -> Response<OutBody> {
    let identity = web::field(query, "identity")
        .unwrap_or("")
        .trim()
        .to_owned();
    let before = web::field(query, "before").and_then(|b| b.parse().ok());
    let limit = 100;
    let filter = (!identity.is_empty()).then_some(identity.as_str());
    match ops::audit_log(&page.admin.app, filter, before, limit).await {
        Ok(entries) => {
            let next_before = (entries.len() as i64 == limit)
                .then(|| entries.last().map(|e| e.id))
                .flatten();
            let entries: Vec<AuditView> = entries.iter().map(AuditView::from).collect();
            page.render(
                StatusCode::OK,
                "audit.html",
                "audit",
                context! { entries, identity, next_before },
            )
        }
        Err(e) => page.error(&e),
    }
}

async fn identity_action(
    page: &Page<'_>,
    name: &str,
    action: &str,
    is_post: bool,
    form: &[(String, String)],
) -> Response<OutBody> {
    let confirmed = web::field(form, "confirm") == Some("yes");
    let action_url = format!("/identities/{}/{action}", web::percent_encode(name));
    match (action, is_post) {
        ("invite", true) => {
            let target = InviteTarget {
                name: name.to_owned(),
                mailbox: None,
                password: None,
                tenant: None,
            };
            match page.ops().invite(vec![target]).await {
                Ok(list) => invited(page, list),
                Err(e) => page.error(&e),
            }
        }
        ("validate", true) => match ops::validate(&page.admin.app, "console", name).await {
            Ok(results) => {
                let words: Vec<String> = results
                    .iter()
                    .map(|v| {
                        if v.ok {
                            format!("{}: ok", v.protocol)
                        } else {
                            format!("{}: failed, {} ({})", v.protocol, v.meaning, v.answer)
                        }
                    })
                    .collect();
                let text = if words.is_empty() {
                    "No front end is enabled, so there was nothing to prove.".to_owned()
                } else {
                    words.join("; ")
                };
                page.message(
                    StatusCode::OK,
                    &format!("Validation of {name}"),
                    &text,
                    "/identities",
                )
            }
            Err(e) => page.error(&e),
        },
        ("revoke", true) => match page.ops().revoke(name).await {
            Ok(n) => page.message(
                StatusCode::OK,
                "Invitations revoked",
                &format!("{n} pending invitation(s) of {name} revoked."),
                "/invitations",
            ),
            Err(e) => page.error(&e),
        },
        ("forget" | "remove", false) => {
            let rec = match page.admin.app.store.get(name).await {
                Ok(Some(r)) => r,
                Ok(None) => return page.error(&AdminError::NotFound(name.to_owned())),
                Err(e) => return page.error(&AdminError::Store(e)),
            };
            let (heading, text, button) = if action == "forget" {
                (
                    format!("Forget {}?", rec.name),
                    format!(
                        "This deletes the registration data of {}: the stored refresh token, cached access tokens, the mailbox, the linked Microsoft account, validation results and invitations. The name and local password stay; the identity becomes pending and the user must be invited again.",
                        rec.name
                    ),
                    "Forget registration data",
                )
            } else {
                (
                    format!("Remove {}?", rec.name),
                    format!(
                        "This deletes the identity {} with its refresh token and personal data. Legacy clients using it stop working at once.",
                        rec.name
                    ),
                    "Remove identity",
                )
            };
            page.render(
                StatusCode::OK,
                "confirm.html",
                "identities",
                context! { heading, text, button, action => action_url },
            )
        }
        ("forget" | "remove", true) if !confirmed => redirect(&action_url),
        ("forget", true) => match page.ops().forget(name).await {
            Ok(v) => page.message(
                StatusCode::OK,
                "Registration data deleted",
                &format!(
                    "{} is pending again; its token and personal data are gone.",
                    v.name
                ),
                "/identities",
            ),
            Err(e) => page.error(&e),
        },
        ("remove", true) => match page.ops().remove(name).await {
            Ok(()) => page.message(
                StatusCode::OK,
                "Identity removed",
                &format!("{name} and its data are deleted."),
                "/identities",
            ),
            Err(e) => page.error(&e),
        },
        _ => page.message(
            StatusCode::NOT_FOUND,
            "Not found",
            "There is no such page.",
            "/identities",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_renders_and_escapes() {
        let pages = Pages::new();
        let evil = "<script>alert(1)</script>";
        let identity = context! {
            name => evil, mailbox => "a@b", status => "needs_reauth", ok => false,
            status_text => "x", last_error => evil, validations => Vec::<u8>::new(),
            tenant => evil, mode => "app",
            failures => context! { http => 2 },
            ews_operations => vec![context! { operation => evil, count => 3 }],
        };
        let ctx = context! {
            signed_in => true, csrf => "tok", nav => "identities",
            identities => vec![identity], filter => "all", q => evil, validate => true,
            tenants => vec![evil, "default"],
            labels => context! { needs_reauth => "Needs re-auth" },
            invitations => Vec::<u8>::new(), entries => Vec::<u8>::new(),
            imported => Vec::<u8>::new(),
            heading => evil, text => evil, button => "Go", action => "/x",
            token_file => "data/admin.token", error => evil,
        };
        for name in [
            "login.html",
            "message.html",
            "confirm.html",
            "invited.html",
            "created.html",
            "identities.html",
            "invitations.html",
            "audit.html",
            "imported.html",
        ] {
            let html = pages
                .env
                .get_template(name)
                .unwrap()
                .render(ctx.clone())
                .unwrap_or_else(|e| panic!("{name}: {e:#}"));
            assert!(!html.contains(evil), "{name} did not escape");
        }
    }

    #[test]
    fn times_are_shown_in_minutes() {
        assert_eq!(when("2026-12-02T14:24:30Z".into()), "2026-12-02 14:24 UTC");
        assert_eq!(when("soon".into()), "soon");
    }

    #[test]
    fn only_local_redirects() {
        assert_eq!(
            safe_next(Some("/identities?status=error")),
            "/identities?status=error"
        );
        assert_eq!(safe_next(Some("//evil.example")), "/identities");
        assert_eq!(safe_next(Some("/\\evil.example")), "/identities");
        assert_eq!(safe_next(Some("https://evil.example")), "/identities");
        assert_eq!(safe_next(None), "/identities");
    }
}
