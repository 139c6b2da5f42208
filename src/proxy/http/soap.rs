//! The EWS `ExchangeImpersonation` SOAP header for app-only tokens.
//!
//! Exchange Online accepts an app-only (client-credentials) token over EWS
//! only when the request names the mailbox it acts as: the HTTP header
//! `X-AnchorMailbox` (the caller's business) and, in the SOAP envelope,
//!
//! ```xml
//! <t:ExchangeImpersonation><t:ConnectingSID>
//!   <t:PrimarySmtpAddress>mailbox</t:PrimarySmtpAddress>
//! </t:ConnectingSID></t:ExchangeImpersonation>
//! ```
//!
//! (`t` = [`TYPES_NS`]) as a direct child of `soap:Header`. This module owns
//! that envelope rewrite, and nothing else: [`impersonate`] reads a request
//! body with quick-xml's streaming, namespace-resolving reader (never by
//! string search) and either
//!
//! * finds an `ExchangeImpersonation` naming the identity's own mailbox:
//!   [`Impersonation::Unchanged`], the caller sends the body byte-identical;
//! * finds one naming any other mailbox (or a SID, which cannot be matched
//!   to a mailbox): [`ImpersonationError::OtherMailbox`] (403: an identity
//!   may only act as its own mailbox);
//! * finds none: [`Impersonation::Rewritten`], the body with the element
//!   inserted just before the Header's end tag (a self-closing
//!   `<P:Header/>` is opened and closed as `<P:Header>…</P:Header>`, same
//!   qualified name), or, when the envelope has no Header, a new
//!   `<P:Header>…</P:Header>` right after the Envelope's start tag, `P`
//!   being the Envelope's own prefix (none under a default namespace).
//!   Every other byte stays as the client wrote it; the caller sets
//!   `Content-Length` to the new length.
//!
//! The inserted element declares `xmlns:t` itself, so no prefix in the
//! client's envelope can clash with it, and its text is ASCII (anything
//! else in the mailbox is written as a character reference), so it fits
//! any ASCII-compatible document encoding.
//!
//! What counts as an envelope: the root element is `Envelope` in the SOAP
//! 1.1 ([`SOAP11_NS`]) or SOAP 1.2 ([`SOAP12_NS`]) namespace, under any
//! prefix or as the default namespace; a UTF-8 byte-order mark, the XML
//! declaration, comments, processing instructions and whitespace may come
//! before it. Its children are an optional `Header` then `Body`, both in
//! the Envelope's namespace, and nothing else. The whole document must be
//! well-formed: a DOCTYPE (entity definitions, billion laughs), an
//! undefined entity, nesting deeper than [`MAX_DEPTH`] or more than
//! [`MAX_ELEMENTS`] elements is [`ImpersonationError::Malformed`] (400).
//! A body that is not an envelope at all is [`ImpersonationError::NotSoap`]
//! (the caller decides what to do with it).

use quick_xml::events::{BytesRef, BytesStart, Event};
use quick_xml::name::{Namespace, QName, ResolveResult};
use quick_xml::reader::NsReader;

/// The EWS types namespace (`t:` in Microsoft's examples).
pub const TYPES_NS: &str = "http://schemas.microsoft.com/exchange/services/2006/types";
/// The SOAP 1.1 envelope namespace.
pub const SOAP11_NS: &str = "http://schemas.xmlsoap.org/soap/envelope/";
/// The SOAP 1.2 envelope namespace.
pub const SOAP12_NS: &str = "http://www.w3.org/2003/05/soap-envelope";
/// The deepest element nesting accepted (the Envelope is depth 1).
pub const MAX_DEPTH: usize = 64;
/// The most elements accepted in one body.
pub const MAX_ELEMENTS: usize = 100_000;

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// What to send upstream for a SOAP request made with an app-only token.
#[derive(Debug, PartialEq, Eq)]
pub enum Impersonation {
    /// The envelope already impersonates this mailbox: send the body as it
    /// is, byte-identical.
    Unchanged,
    /// The body with the `ExchangeImpersonation` header inserted (its
    /// length is the new `Content-Length`).
    Rewritten(Vec<u8>),
}

/// Why a body cannot be sent with an app-only token on behalf of a mailbox.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImpersonationError {
    /// The envelope impersonates another mailbox (or a SID): 403.
    #[error("the request impersonates {named}, not the identity's own mailbox")]
    OtherMailbox {
        /// What the envelope names (`SID …` for a SID).
        named: String,
    },
    /// The body is not a SOAP envelope.
    #[error("the request body is not a SOAP envelope")]
    NotSoap,
    /// The envelope is not well-formed, or not one authswap accepts: 400.
    #[error("malformed SOAP envelope: {0}")]
    Malformed(String),
    /// The mailbox cannot be written into XML (empty, or a control
    /// character): the identity's configuration is wrong, not the request.
    #[error("the identity's mailbox cannot be named in a SOAP header")]
    InvalidMailbox,
}

/// Makes `body` impersonate `mailbox` (see the module documentation).
pub fn impersonate(body: &[u8], mailbox: &str) -> Result<Impersonation, ImpersonationError> {
    let element = impersonation_element(mailbox)?;
    let found = scan(body)?;
    let spliced = |at: usize, remove: usize, parts: &[&[u8]]| {
        let extra: usize = parts.iter().map(|p| p.len()).sum();
        let mut out = Vec::with_capacity(body.len() + extra);
        out.extend_from_slice(&body[..at]);
        for p in parts {
            out.extend_from_slice(p);
        }
        out.extend_from_slice(&body[at + remove..]);
        Impersonation::Rewritten(out)
    };
    Ok(match found {
        Found::Named(Address::Mailbox(named)) if same_mailbox(&named, mailbox) => {
            Impersonation::Unchanged
        }
        Found::Named(Address::Mailbox(named)) => {
            return Err(ImpersonationError::OtherMailbox {
                named: named.trim().to_owned(),
            })
        }
        Found::Named(Address::Sid(sid)) => {
            return Err(ImpersonationError::OtherMailbox {
                named: format!("SID {}", sid.trim()),
            })
        }
        Found::HeaderEnd { at } => spliced(at, 0, &[&element]),
        Found::SelfClosingHeader { slash, qname } => {
            // `<P:Header …/>`: the `/` goes, the `>` stays and closes the
            // start tag; the content and the end tag follow it.
            let mut tail = Vec::with_capacity(element.len() + qname.len() + 4);
            tail.push(b'>');
            tail.extend_from_slice(&element);
            tail.extend_from_slice(b"</");
            tail.extend_from_slice(&qname);
            tail.push(b'>');
            spliced(slash, 2, &[&tail])
        }
        Found::NoHeader { at, prefix } => {
            let qname = match &prefix {
                Some(p) => [p.as_slice(), b":Header"].concat(),
                None => b"Header".to_vec(),
            };
            spliced(at, 0, &[b"<", &qname, b">", &element, b"</", &qname, b">"])
        }
    })
}

/// What a request by an identity with an app-only token sends besides the
/// token: the `X-AnchorMailbox` value, and the body when it was rewritten.
#[derive(Debug)]
pub struct AppRequest {
    /// `X-AnchorMailbox` (replacing any the client sent).
    pub anchor: http::HeaderValue,
    /// `Some`: send this body instead, with `Content-Length` set to its
    /// length; `None`: the client's body, byte-identical.
    pub body: Option<Vec<u8>>,
}

/// The wire halves' entry point (issue 13). `mailbox`: the mailbox an
/// identity with an app-only token acts as; `None` (a delegated token)
/// adds nothing and reads nothing. `body` is the whole buffered request
/// body (a body too large to buffer is the caller's 413). A body that is
/// not a SOAP envelope (an empty one included) goes as it is, with the
/// anchor; otherwise [`impersonate`] decides.
pub fn app_request(
    mailbox: Option<&str>,
    body: &[u8],
) -> Result<Option<AppRequest>, ImpersonationError> {
    let Some(mailbox) = mailbox else {
        return Ok(None);
    };
    let anchor = http::HeaderValue::from_str(mailbox.trim())
        .map_err(|_| ImpersonationError::InvalidMailbox)?;
    let body = match impersonate(body, mailbox) {
        Ok(Impersonation::Unchanged) | Err(ImpersonationError::NotSoap) => None,
        Ok(Impersonation::Rewritten(body)) => Some(body),
        Err(e) => return Err(e),
    };
    Ok(Some(AppRequest { anchor, body }))
}

/// The element inserted for `mailbox`.
fn impersonation_element(mailbox: &str) -> Result<Vec<u8>, ImpersonationError> {
    if mailbox.trim().is_empty() || mailbox.chars().any(char::is_control) {
        return Err(ImpersonationError::InvalidMailbox);
    }
    let mut escaped = String::with_capacity(mailbox.len());
    for c in mailbox.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            c if c.is_ascii() => escaped.push(c),
            c => escaped.push_str(&format!("&#x{:X};", u32::from(c))),
        }
    }
    Ok(format!(
        "<t:ExchangeImpersonation xmlns:t=\"{TYPES_NS}\"><t:ConnectingSID>\
         <t:PrimarySmtpAddress>{escaped}</t:PrimarySmtpAddress>\
         </t:ConnectingSID></t:ExchangeImpersonation>"
    )
    .into_bytes())
}

/// Whether an address from an envelope names `mailbox`: trimmed, without
/// regard to case.
fn same_mailbox(named: &str, mailbox: &str) -> bool {
    named.trim().to_lowercase() == mailbox.trim().to_lowercase()
}

/// What an envelope says about impersonation.
#[derive(Debug)]
enum Found {
    /// An `ExchangeImpersonation` header naming this.
    Named(Address),
    /// None; the Header's end tag starts at `at`.
    HeaderEnd { at: usize },
    /// None, and the Header is self-closing: its `/>` is at `slash`.
    SelfClosingHeader { slash: usize, qname: Vec<u8> },
    /// No Header: the Envelope's start tag ends at `at`.
    NoHeader { at: usize, prefix: Option<Vec<u8>> },
}

/// The address in a `ConnectingSID`, unescaped.
#[derive(Debug)]
enum Address {
    /// `PrimarySmtpAddress`, `SmtpAddress` or `PrincipalName`.
    Mailbox(String),
    /// `SID`.
    Sid(String),
}

fn malformed(why: impl Into<String>) -> ImpersonationError {
    ImpersonationError::Malformed(why.into())
}

/// Reads the whole body and says where the impersonation is or goes.
fn scan(body: &[u8]) -> Result<Found, ImpersonationError> {
    // quick-xml drops a BOM without counting it in its positions: it is
    // taken off here, and positions are offset by it.
    let (base, xml) = match body.strip_prefix(UTF8_BOM) {
        Some(rest) => (UTF8_BOM.len(), rest),
        None => (0, body),
    };
    let mut w = Walker::new(xml, base);

    // Prolog: anything but markup there means it is not an envelope.
    let (root, env_ns) = loop {
        let event = match w.next() {
            Ok((_, event)) => event,
            Err(e @ ImpersonationError::Malformed(_)) if w.doctype => return Err(e),
            Err(_) => return Err(ImpersonationError::NotSoap),
        };
        match event {
            Event::Start(e) | Event::Empty(e) if !w.is_soap_envelope(&e) => {
                return Err(ImpersonationError::NotSoap)
            }
            Event::Empty(_) => return Err(malformed("the Envelope is empty")),
            Event::Start(e) => {
                let ns = w.soap_ns(e.name()).ok_or(ImpersonationError::NotSoap)?;
                break (e, ns);
            }
            Event::Text(t) if t.iter().all(u8::is_ascii_whitespace) => {}
            Event::Decl(_) | Event::Comment(_) | Event::PI(_) => {}
            _ => return Err(ImpersonationError::NotSoap),
        }
    };
    let after_envelope = w.end();
    let prefix = root.name().prefix().map(|p| p.as_ref().to_vec());

    // The Envelope's children: Header?, Body.
    let mut found = None;
    let mut body_seen = false;
    loop {
        match w.next()?.1 {
            Event::Start(_) | Event::Empty(_) if body_seen => {
                return Err(malformed("an element after the Body"));
            }
            Event::Start(e) | Event::Empty(e) if w.is(e.name(), env_ns, "Body") => {
                if w.last_was_start {
                    w.skip()?;
                }
                body_seen = true;
            }
            Event::Start(_) | Event::Empty(_) if found.is_some() => {
                return Err(malformed("an element between the Header and the Body"));
            }
            Event::Start(e) if w.is(e.name(), env_ns, "Header") => {
                found = Some(w.header()?);
            }
            Event::Empty(e) if w.is(e.name(), env_ns, "Header") => {
                // An empty-element tag ends with `/>`.
                found = Some(Found::SelfClosingHeader {
                    slash: w.end() - 2,
                    qname: e.name().as_ref().to_vec(),
                });
            }
            Event::Start(_) | Event::Empty(_) => {
                return Err(malformed(
                    "the Envelope's first child is neither Header nor Body",
                ))
            }
            // The Envelope's: every other element was read to its end.
            Event::End(_) => break,
            _ => {}
        }
    }
    if !body_seen {
        return Err(malformed("the Envelope has no Body"));
    }

    // Epilog: only whitespace, comments and processing instructions.
    loop {
        match w.next()?.1 {
            Event::Eof => break,
            Event::Text(t) if t.iter().all(u8::is_ascii_whitespace) => {}
            Event::Comment(_) | Event::PI(_) => {}
            _ => return Err(malformed("content after the Envelope")),
        }
    }
    Ok(found.unwrap_or(Found::NoHeader {
        at: after_envelope,
        prefix,
    }))
}

/// A streaming pass over the document, with the bounds and the
/// well-formedness checks quick-xml leaves to its user.
struct Walker<'a> {
    reader: NsReader<&'a [u8]>,
    /// Bytes before what the reader sees (a BOM).
    base: usize,
    /// Open elements.
    depth: usize,
    elements: usize,
    last_was_start: bool,
    /// A DOCTYPE was refused.
    doctype: bool,
}

impl<'a> Walker<'a> {
    fn new(xml: &'a [u8], base: usize) -> Walker<'a> {
        let mut reader = NsReader::from_reader(xml);
        let config = reader.config_mut();
        config.check_comments = true;
        config.check_end_names = true;
        config.expand_empty_elements = false;
        config.trim_text(false);
        Walker {
            reader,
            base,
            depth: 0,
            elements: 0,
            last_was_start: false,
            doctype: false,
        }
    }

    /// Where the reader is in the body (just past the last event).
    fn end(&self) -> usize {
        self.base + usize::try_from(self.reader.buffer_position()).unwrap_or(usize::MAX)
    }

    /// The next event, and where in the body it starts.
    fn next(&mut self) -> Result<(usize, Event<'a>), ImpersonationError> {
        let start = self.end();
        let event = self
            .reader
            .read_event()
            .map_err(|e| malformed(e.to_string()))?;
        match &event {
            Event::Start(e) => {
                self.element(e)?;
                self.depth += 1;
                self.last_was_start = true;
                if self.depth > MAX_DEPTH {
                    return Err(malformed("elements nested too deep"));
                }
            }
            Event::Empty(e) => {
                self.element(e)?;
                self.last_was_start = false;
            }
            Event::End(_) => {
                // quick-xml refuses an end tag that closes nothing.
                self.depth = self.depth.saturating_sub(1);
            }
            Event::GeneralRef(r) => {
                reference(r)?;
            }
            Event::DocType(_) => {
                self.doctype = true;
                return Err(malformed("a DOCTYPE is not accepted"));
            }
            Event::Eof if self.depth > 0 => {
                return Err(malformed("the document ends inside an element"));
            }
            _ => {}
        }
        Ok((start, event))
    }

    /// Counts an element and checks its attributes' syntax.
    fn element(&mut self, e: &BytesStart<'_>) -> Result<(), ImpersonationError> {
        self.elements += 1;
        if self.elements > MAX_ELEMENTS {
            return Err(malformed("too many elements"));
        }
        for attribute in e.attributes().with_checks(true) {
            attribute.map_err(|e| malformed(e.to_string()))?;
        }
        Ok(())
    }

    /// The element's namespace and local name.
    fn resolve<'n>(&self, name: QName<'n>) -> (Option<&[u8]>, &'n [u8]) {
        let (ns, local) = self.reader.resolver().resolve_element(name);
        let ns = match ns {
            ResolveResult::Bound(Namespace(ns)) => Some(ns),
            _ => None,
        };
        (ns, local.into_inner())
    }

    fn is(&self, name: QName<'_>, ns: &str, local: &str) -> bool {
        self.resolve(name) == (Some(ns.as_bytes()), local.as_bytes())
    }

    /// The SOAP namespace `name` is in, if it is one.
    fn soap_ns(&self, name: QName<'_>) -> Option<&'static str> {
        match self.resolve(name).0 {
            Some(ns) if ns == SOAP11_NS.as_bytes() => Some(SOAP11_NS),
            Some(ns) if ns == SOAP12_NS.as_bytes() => Some(SOAP12_NS),
            _ => None,
        }
    }

    fn is_soap_envelope(&self, e: &BytesStart<'_>) -> bool {
        self.soap_ns(e.name()).is_some() && e.local_name().as_ref() == b"Envelope"
    }

    /// Reads to the end of the element whose start tag was just read.
    fn skip(&mut self) -> Result<(), ImpersonationError> {
        let depth = self.depth;
        while self.depth >= depth {
            self.next()?;
        }
        Ok(())
    }

    /// Reads a Header whose start tag was just read, to its end tag.
    fn header(&mut self) -> Result<Found, ImpersonationError> {
        let depth = self.depth;
        let mut named = None;
        loop {
            let (start, event) = self.next()?;
            match event {
                Event::End(_) if self.depth < depth => {
                    return Ok(match named {
                        Some(address) => Found::Named(address),
                        None => Found::HeaderEnd { at: start },
                    });
                }
                // Every other child is read to its end below: this is one
                // of the Header's own.
                Event::Start(e) | Event::Empty(e)
                    if self.is(e.name(), TYPES_NS, "ExchangeImpersonation") =>
                {
                    if named.is_some() {
                        return Err(malformed("two ExchangeImpersonation headers"));
                    }
                    if !self.last_was_start {
                        return Err(malformed("ExchangeImpersonation names no mailbox"));
                    }
                    named = Some(self.impersonation()?);
                }
                Event::Start(_) => self.skip()?,
                _ => {}
            }
        }
    }

    /// Reads an `ExchangeImpersonation` whose start tag was just read.
    fn impersonation(&mut self) -> Result<Address, ImpersonationError> {
        let depth = self.depth;
        let mut address = None;
        loop {
            match self.next()?.1 {
                Event::End(_) if self.depth < depth => {
                    return address
                        .ok_or_else(|| malformed("ExchangeImpersonation names no mailbox"));
                }
                Event::Start(e) | Event::Empty(e)
                    if self.is(e.name(), TYPES_NS, "ConnectingSID") =>
                {
                    if address.is_some() {
                        return Err(malformed("two ConnectingSID elements"));
                    }
                    if !self.last_was_start {
                        return Err(malformed("ConnectingSID names no mailbox"));
                    }
                    address = Some(self.connecting_sid()?);
                }
                Event::Start(_) => self.skip()?,
                _ => {}
            }
        }
    }

    /// Reads a `ConnectingSID` whose start tag was just read.
    fn connecting_sid(&mut self) -> Result<Address, ImpersonationError> {
        let depth = self.depth;
        let mut address = None;
        loop {
            match self.next()?.1 {
                Event::End(_) if self.depth < depth => {
                    return address.ok_or_else(|| malformed("ConnectingSID names no mailbox"));
                }
                Event::Start(e) | Event::Empty(e) => {
                    let opened = self.last_was_start;
                    let sid = match self.resolve(e.name()) {
                        (Some(ns), local) if ns == TYPES_NS.as_bytes() => match local {
                            b"PrimarySmtpAddress" | b"SmtpAddress" | b"PrincipalName" => {
                                Some(false)
                            }
                            b"SID" => Some(true),
                            _ => None,
                        },
                        _ => None,
                    };
                    let Some(sid) = sid else {
                        if opened {
                            self.skip()?;
                        }
                        continue;
                    };
                    if address.is_some() {
                        return Err(malformed("ConnectingSID names two addresses"));
                    }
                    let text = if opened { self.text()? } else { String::new() };
                    if text.trim().is_empty() {
                        return Err(malformed("ConnectingSID names an empty address"));
                    }
                    address = Some(if sid {
                        Address::Sid(text)
                    } else {
                        Address::Mailbox(text)
                    });
                }
                _ => {}
            }
        }
    }

    /// The unescaped text of an element whose start tag was just read, to
    /// its end tag; it may hold no elements.
    fn text(&mut self) -> Result<String, ImpersonationError> {
        let mut text = String::new();
        loop {
            match self.next()?.1 {
                Event::Text(t) => text.push_str(&t.decode().map_err(|e| malformed(e.to_string()))?),
                Event::CData(t) => {
                    text.push_str(&t.decode().map_err(|e| malformed(e.to_string()))?)
                }
                Event::GeneralRef(r) => text.push(reference(&r)?),
                Event::End(_) => return Ok(text),
                Event::Start(_) | Event::Empty(_) => {
                    return Err(malformed("an element inside an address"))
                }
                _ => {}
            }
        }
    }
}

/// The character an entity or character reference stands for; with no
/// DTD, only the five predefined entities exist.
fn reference(r: &BytesRef<'_>) -> Result<char, ImpersonationError> {
    if r.is_char_ref() {
        return match r.resolve_char_ref() {
            Ok(Some(c)) if is_xml_char(c) => Ok(c),
            _ => Err(malformed("an invalid character reference")),
        };
    }
    match &**r {
        b"lt" => Ok('<'),
        b"gt" => Ok('>'),
        b"amp" => Ok('&'),
        b"apos" => Ok('\''),
        b"quot" => Ok('"'),
        _ => Err(malformed("an undefined entity")),
    }
}

/// XML 1.0's `Char` production.
fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..='\u{10FFFF}')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ME: &str = "alice@contoso.com";

    /// The element inserted for `mailbox`, written out independently.
    fn inserted(mailbox_xml: &str) -> String {
        format!(
            "<t:ExchangeImpersonation xmlns:t=\"http://schemas.microsoft.com/exchange/services/2006/types\">\
             <t:ConnectingSID><t:PrimarySmtpAddress>{mailbox_xml}</t:PrimarySmtpAddress>\
             </t:ConnectingSID></t:ExchangeImpersonation>"
        )
    }

    fn rewritten(body: &str, mailbox: &str) -> String {
        match impersonate(body.as_bytes(), mailbox) {
            Ok(Impersonation::Rewritten(out)) => String::from_utf8(out).unwrap(),
            other => panic!("not rewritten: {other:?}\n{body}"),
        }
    }

    fn err(body: &str) -> ImpersonationError {
        impersonate(body.as_bytes(), ME).expect_err(body)
    }

    fn is_malformed(body: &str) -> bool {
        matches!(err(body), ImpersonationError::Malformed(_))
    }

    /// Impersonations in `xml` (an `ExchangeImpersonation` element in the
    /// types namespace anywhere), counted with the reader, and the
    /// addresses they name.
    fn impersonations(xml: &[u8]) -> Vec<String> {
        let xml = xml.strip_prefix(UTF8_BOM).unwrap_or(xml);
        let mut r = NsReader::from_reader(xml);
        let mut found = Vec::new();
        let mut in_address = false;
        loop {
            match r.read_resolved_event().unwrap() {
                (ResolveResult::Bound(Namespace(ns)), Event::Start(e))
                    if ns == TYPES_NS.as_bytes() =>
                {
                    match e.local_name().as_ref() {
                        b"ExchangeImpersonation" => found.push(String::new()),
                        b"PrimarySmtpAddress" => in_address = true,
                        _ => {}
                    }
                }
                (_, Event::Text(t)) if in_address => {
                    found.last_mut().unwrap().push_str(&t.decode().unwrap())
                }
                (_, Event::GeneralRef(g)) if in_address => {
                    let c = reference(&g).unwrap();
                    found.last_mut().unwrap().push(c)
                }
                (_, Event::End(_)) => in_address = false,
                (_, Event::Eof) => return found,
                _ => {}
            }
        }
    }

    const EWS: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"
               xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types"
               xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages">
  <soap:Header>
    <t:RequestServerVersion Version="Exchange2016" />
  </soap:Header>
  <soap:Body>
    <m:GetFolder><m:FolderShape><t:BaseShape>Default</t:BaseShape></m:FolderShape>
      <m:FolderIds><t:DistinguishedFolderId Id="inbox"/></m:FolderIds></m:GetFolder>
  </soap:Body>
</soap:Envelope>
"#;

    #[test]
    fn inserted_before_the_end_of_an_existing_header() {
        let out = rewritten(EWS, ME);
        let at = EWS.find("</soap:Header>").unwrap();
        let expected = format!("{}{}{}", &EWS[..at], inserted(ME), &EWS[at..]);
        assert_eq!(out, expected);
        assert_eq!(impersonations(out.as_bytes()), [ME]);
        assert_eq!(
            impersonate(out.as_bytes(), ME),
            Ok(Impersonation::Unchanged)
        );
    }

    #[test]
    fn a_self_closing_header_is_opened_under_its_own_name() {
        for (header, open) in [
            ("<soap:Header/>", "<soap:Header>"),
            ("<soap:Header a='1' />", "<soap:Header a='1' >"),
        ] {
            let body = EWS.replace(
                "<soap:Header>\n    <t:RequestServerVersion Version=\"Exchange2016\" />\n  </soap:Header>",
                header,
            );
            let out = rewritten(&body, ME);
            let expected = body.replace(header, &format!("{open}{}</soap:Header>", inserted(ME)));
            assert_eq!(out, expected);
            assert_eq!(
                impersonate(out.as_bytes(), ME),
                Ok(Impersonation::Unchanged)
            );
        }
    }

    #[test]
    fn a_missing_header_is_created_with_the_envelopes_prefix() {
        let body = concat!(
            "<S:Envelope xmlns:S=\"http://www.w3.org/2003/05/soap-envelope\">",
            "<S:Body><x/></S:Body></S:Envelope>"
        );
        assert_eq!(
            rewritten(body, ME),
            format!(
                "<S:Envelope xmlns:S=\"http://www.w3.org/2003/05/soap-envelope\">\
                 <S:Header>{}</S:Header><S:Body><x/></S:Body></S:Envelope>",
                inserted(ME)
            )
        );
        // A default namespace: no prefix.
        let body = concat!(
            "\u{feff}<!-- hi --><Envelope xmlns=\"http://schemas.xmlsoap.org/soap/envelope/\">\n",
            "<Body/></Envelope>\n"
        );
        let out = rewritten(body, ME);
        assert_eq!(
            out,
            format!(
                "\u{feff}<!-- hi --><Envelope xmlns=\"http://schemas.xmlsoap.org/soap/envelope/\">\
                 <Header>{}</Header>\n<Body/></Envelope>\n",
                inserted(ME)
            )
        );
        assert_eq!(
            impersonate(out.as_bytes(), ME),
            Ok(Impersonation::Unchanged)
        );
    }

    #[test]
    fn an_impersonation_of_the_mailbox_itself_is_left_alone() {
        for address in [
            "<t:PrimarySmtpAddress>alice@contoso.com</t:PrimarySmtpAddress>",
            "<t:PrimarySmtpAddress>\n  Alice@Contoso.COM </t:PrimarySmtpAddress>",
            "<t:PrimarySmtpAddress>&#x61;lice@contoso.com</t:PrimarySmtpAddress>",
            "<t:PrimarySmtpAddress><![CDATA[alice@contoso.com]]></t:PrimarySmtpAddress>",
            "<t:SmtpAddress>alice@contoso.com</t:SmtpAddress>",
            "<t:PrincipalName>ALICE@contoso.com</t:PrincipalName>",
            "<!-- c --><t:PrimarySmtpAddress>alice@<!-- c -->contoso.com</t:PrimarySmtpAddress>",
        ] {
            let body = EWS.replace(
                "</soap:Header>",
                &format!(
                    "<t:ExchangeImpersonation><t:ConnectingSID>{address}\
                     </t:ConnectingSID></t:ExchangeImpersonation></soap:Header>"
                ),
            );
            assert_eq!(
                impersonate(body.as_bytes(), ME),
                Ok(Impersonation::Unchanged),
                "{address}"
            );
        }
        // Any prefix, declared anywhere.
        let body = concat!(
            "<e:Envelope xmlns:e='http://schemas.xmlsoap.org/soap/envelope/'><e:Header>",
            "<ExchangeImpersonation xmlns='http://schemas.microsoft.com/exchange/services/2006/types'>",
            "<ConnectingSID><PrimarySmtpAddress>alice@contoso.com</PrimarySmtpAddress>",
            "</ConnectingSID></ExchangeImpersonation></e:Header><e:Body/></e:Envelope>"
        );
        assert_eq!(
            impersonate(body.as_bytes(), ME),
            Ok(Impersonation::Unchanged)
        );
    }

    #[test]
    fn another_mailbox_or_a_sid_is_refused() {
        let with = |address: &str| {
            EWS.replace(
                "</soap:Header>",
                &format!(
                    "<t:ExchangeImpersonation><t:ConnectingSID>{address}\
                     </t:ConnectingSID></t:ExchangeImpersonation></soap:Header>"
                ),
            )
        };
        assert_eq!(
            err(&with(
                "<t:PrimarySmtpAddress> bob@contoso.com </t:PrimarySmtpAddress>"
            )),
            ImpersonationError::OtherMailbox {
                named: "bob@contoso.com".into()
            }
        );
        assert_eq!(
            err(&with("<t:SID>S-1-5-21-1</t:SID>")),
            ImpersonationError::OtherMailbox {
                named: "SID S-1-5-21-1".into()
            }
        );
        assert_eq!(
            err(&with(
                "<t:PrincipalName>alice@contoso.com.evil</t:PrincipalName>"
            )),
            ImpersonationError::OtherMailbox {
                named: "alice@contoso.com.evil".into()
            }
        );
        // No address, two addresses, an empty one.
        assert!(is_malformed(&with("")));
        assert!(is_malformed(&with("<t:PrimarySmtpAddress/>")));
        assert!(is_malformed(&with(
            "<t:SmtpAddress>alice@contoso.com</t:SmtpAddress><t:SID>S-1</t:SID>"
        )));
        assert!(is_malformed(&with(
            "<t:PrimarySmtpAddress>alice<b/></t:PrimarySmtpAddress>"
        )));
        // Two impersonations, even of the same mailbox.
        let two = with("<t:SmtpAddress>alice@contoso.com</t:SmtpAddress>")
            .replace("</soap:Header>", &format!("{}</soap:Header>", inserted(ME)));
        assert!(is_malformed(&two));
    }

    #[test]
    fn only_a_direct_child_in_the_types_namespace_counts() {
        // In another namespace, or nested deeper: not an impersonation.
        for header in [
            "<x:ExchangeImpersonation xmlns:x='urn:other'><x:ConnectingSID>\
             <x:PrimarySmtpAddress>bob@contoso.com</x:PrimarySmtpAddress>\
             </x:ConnectingSID></x:ExchangeImpersonation>",
            "<w><t:ExchangeImpersonation><t:ConnectingSID><t:PrimarySmtpAddress>\
             bob@contoso.com</t:PrimarySmtpAddress></t:ConnectingSID>\
             </t:ExchangeImpersonation></w>",
        ] {
            let body = EWS.replace("</soap:Header>", &format!("{header}</soap:Header>"));
            let out = rewritten(&body, ME);
            assert!(out.ends_with(&format!(
                "{header}{}</soap:Header>{}",
                inserted(ME),
                &EWS[EWS.find("</soap:Header>").unwrap() + 14..]
            )));
        }
        // A prefix `t` bound to something else in the Header does not
        // capture the inserted element.
        let body = EWS.replace("<soap:Header>", "<soap:Header xmlns:t='urn:not-ews'>");
        let out = rewritten(&body, ME);
        assert_eq!(impersonations(out.as_bytes()), [ME]);
        assert_eq!(
            impersonate(out.as_bytes(), ME),
            Ok(Impersonation::Unchanged)
        );
    }

    #[test]
    fn the_mailbox_is_escaped_as_ascii() {
        let mailbox = "j\u{fc}rgen&<o'brien>@m\u{fc}ller.example";
        let out = rewritten(EWS, mailbox);
        assert!(out.contains(&inserted(
            "j&#xFC;rgen&amp;&lt;o'brien&gt;@m&#xFC;ller.example"
        )));
        assert_eq!(impersonations(out.as_bytes()), [mailbox]);
        assert_eq!(
            impersonate(out.as_bytes(), mailbox),
            Ok(Impersonation::Unchanged)
        );
        assert_eq!(
            impersonate(EWS.as_bytes(), ""),
            Err(ImpersonationError::InvalidMailbox)
        );
        assert_eq!(
            impersonate(EWS.as_bytes(), "a\u{0}b@c"),
            Err(ImpersonationError::InvalidMailbox)
        );
    }

    #[test]
    fn what_is_not_an_envelope() {
        for body in [
            "",
            "   ",
            "{\"json\": \"<x>\"}",
            "hello",
            "<html><body/></html>",
            "<Envelope><Body/></Envelope>",
            "<s:Envelope xmlns:s='urn:soap-ish'><s:Body/></s:Envelope>",
            "<soap:Body xmlns:soap='http://schemas.xmlsoap.org/soap/envelope/'/>",
        ] {
            assert_eq!(err(body), ImpersonationError::NotSoap, "{body}");
        }
    }

    #[test]
    fn what_is_malformed() {
        let env = |inner: &str| {
            format!(
                "<soap:Envelope xmlns:soap='http://schemas.xmlsoap.org/soap/envelope/'>{inner}</soap:Envelope>"
            )
        };
        let deep = format!("{}{}", "<a>".repeat(MAX_DEPTH), "</a>".repeat(MAX_DEPTH));
        for body in [
            "<!DOCTYPE soap:Envelope [<!ENTITY x 'y'>]><soap:Envelope \
             xmlns:soap='http://schemas.xmlsoap.org/soap/envelope/'><soap:Body/></soap:Envelope>"
                .to_owned(),
            "<soap:Envelope xmlns:soap='http://schemas.xmlsoap.org/soap/envelope/'/>".to_owned(),
            env(""),
            env("<soap:Header/>"),
            env("<soap:Body>"),
            env("<soap:Body/></x>"),
            env("<soap:Body/><soap:Header/>"),
            env("<soap:Header/><soap:Header/><soap:Body/>"),
            env("<soap:Header/><x/><soap:Body/>"),
            env("<x/><soap:Body/>"),
            env("<soap:Body>&bogus;</soap:Body>"),
            env("<soap:Body>&#0;</soap:Body>"),
            env("<soap:Body a='1' a='2'/>"),
            env("<soap:Body a=1/>"),
            env("<soap:Body><!-- a -- b --></soap:Body>"),
            env(&format!("<soap:Body>{deep}</soap:Body>")),
            format!("{}<more/>", env("<soap:Body/>")),
            format!("{}text", env("<soap:Body/>")),
        ] {
            assert!(
                is_malformed(&body),
                "{body}: {:?}",
                impersonate(body.as_bytes(), ME)
            );
        }
        // Just within the bounds.
        let deep = format!(
            "{}{}",
            "<a>".repeat(MAX_DEPTH - 2),
            "</a>".repeat(MAX_DEPTH - 2)
        );
        assert!(impersonate(
            env(&format!("<soap:Body>{deep}</soap:Body>")).as_bytes(),
            ME
        )
        .is_ok());
        let many = "<a/>".repeat(MAX_ELEMENTS);
        assert!(is_malformed(&env(&format!(
            "<soap:Body>{many}</soap:Body>"
        ))));
    }

    #[test]
    fn app_requests_get_an_anchor_and_an_impersonation() {
        // Delegated: nothing, whatever the body.
        assert!(app_request(None, b"<not xml").unwrap().is_none());
        let r = app_request(Some(ME), EWS.as_bytes()).unwrap().unwrap();
        assert_eq!(r.anchor, ME);
        assert_eq!(r.body.unwrap(), rewritten(EWS, ME).into_bytes());
        // Already impersonating, not SOAP, empty: the body as it is.
        let own = rewritten(EWS, ME);
        for body in [own.as_bytes(), b"{}", b""] {
            let r = app_request(Some(ME), body).unwrap().unwrap();
            assert_eq!(r.anchor, ME);
            assert!(r.body.is_none());
        }
        assert!(matches!(
            app_request(Some("bob@contoso.com"), own.as_bytes()),
            Err(ImpersonationError::OtherMailbox { .. })
        ));
        assert!(matches!(
            app_request(Some(ME), b"<!DOCTYPE x><x/>"),
            Err(ImpersonationError::Malformed(_))
        ));
        // Non-ASCII goes into the field as UTF-8 (obs-text).
        let r = app_request(Some("j\u{fc}rgen@example.de"), b"")
            .unwrap()
            .unwrap();
        assert_eq!(r.anchor.as_bytes(), "j\u{fc}rgen@example.de".as_bytes());
        assert!(matches!(
            app_request(Some("alice@contoso.com\r\nx: y"), b""),
            Err(ImpersonationError::InvalidMailbox)
        ));
    }

    /// Pieces of a generated envelope.
    #[derive(Debug, Clone)]
    struct Parts {
        bom: bool,
        decl: bool,
        prefix: Option<String>,
        soap12: bool,
        /// Bound on the Envelope: `t` to the types namespace or to another.
        t_is_types: bool,
        attributes: Vec<(String, String)>,
        /// 0 no Header, 1 `<P:Header/>`, 2 one with content, 3 one naming
        /// the mailbox already.
        header: u8,
        spaces: Vec<String>,
        comment: String,
    }

    fn parts() -> impl Strategy<Value = Parts> {
        let space =
            prop::collection::vec(prop::sample::select(vec![" ", "\n", "\t", "\r\n"]), 0..3)
                .prop_map(|v| v.concat());
        (
            any::<bool>(),
            any::<bool>(),
            prop::option::of("[a-zA-Z][a-zA-Z0-9_-]{0,6}"),
            any::<bool>(),
            any::<bool>(),
            prop::collection::vec(("[a-z][a-z0-9]{0,4}", "[a-zA-Z0-9 <>&'\"]{0,8}"), 0..3),
            0u8..4,
            prop::collection::vec(space, 8),
            "[a-zA-Z0-9 <>&']{0,12}",
        )
            .prop_map(
                |(bom, decl, prefix, soap12, t_is_types, attributes, header, spaces, comment)| {
                    Parts {
                        bom,
                        decl,
                        prefix: prefix.filter(|p| !p.to_ascii_lowercase().starts_with("xml")),
                        soap12,
                        t_is_types,
                        attributes,
                        header,
                        spaces,
                        comment,
                    }
                },
            )
    }

    fn xml_attr(v: &str) -> String {
        v.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('"', "&quot;")
    }

    /// The envelope, and the expected rewrite (None: unchanged).
    fn build(p: &Parts, mailbox: &str, mailbox_xml: &str) -> (String, Option<String>) {
        let s = |i: usize| p.spaces[i].as_str();
        let q = |local: &str| match &p.prefix {
            Some(prefix) => format!("{prefix}:{local}"),
            None => local.to_owned(),
        };
        let ns = if p.soap12 { SOAP12_NS } else { SOAP11_NS };
        let mut start = format!("<{}", q("Envelope"));
        match &p.prefix {
            Some(prefix) => start += &format!(" xmlns:{prefix}=\"{ns}\""),
            None => start += &format!(" xmlns=\"{ns}\""),
        }
        let t = if p.t_is_types { TYPES_NS } else { "urn:x" };
        if p.prefix.as_deref() != Some("t") {
            start += &format!("{} xmlns:t=\"{t}\"", s(0));
        }
        let mut seen = std::collections::HashSet::new();
        for (name, value) in &p.attributes {
            if name != "t" && seen.insert(name) {
                start += &format!(" a{name}=\"{}\"", xml_attr(value));
            }
        }
        start += s(1);
        start += ">";
        let mut head = String::new();
        if p.bom {
            head.push('\u{feff}');
        }
        if p.decl {
            head += "<?xml version=\"1.0\" encoding=\"utf-8\"?>";
        }
        let comment = format!("<!--{}-->", p.comment.replace('-', "_"));
        head += &format!("{}{comment}{}", s(2), s(3));
        head += &start;
        let body = format!(
            "{}<{b}{}><m:Op xmlns:m=\"urn:m\">{}</m:Op></{b}>{}</{e}>{}",
            s(4),
            s(5),
            xml_attr(&p.comment),
            s(6),
            s(7),
            b = q("Body"),
            e = q("Envelope"),
        );
        let imp = inserted(mailbox_xml);
        let h = q("Header");
        match p.header {
            0 => (
                format!("{head}{body}"),
                Some(format!("{head}<{h}>{imp}</{h}>{body}")),
            ),
            1 => (
                format!("{head}{}<{h}{}/>{body}", s(4), s(5)),
                Some(format!("{head}{}<{h}{}>{imp}</{h}>{body}", s(4), s(5))),
            ),
            2 => {
                let open = format!(
                    "{head}{}<{h}>{comment}<v:V xmlns:v=\"urn:v\"{}/>{}",
                    s(4),
                    s(5),
                    s(6)
                );
                (
                    format!("{open}</{h}>{body}"),
                    Some(format!("{open}{imp}</{h}>{body}")),
                )
            }
            _ => {
                let upper: String = mailbox
                    .to_uppercase()
                    .chars()
                    .map(|c| match c {
                        '&' => "&amp;".to_owned(),
                        c if c.is_ascii() => c.to_string(),
                        c => format!("&#{};", u32::from(c)),
                    })
                    .collect();
                let named = format!(
                    "<i:ExchangeImpersonation xmlns:i=\"{TYPES_NS}\">{}<i:ConnectingSID>\
                     <i:SmtpAddress>{}{upper}{}</i:SmtpAddress></i:ConnectingSID>\
                     </i:ExchangeImpersonation>",
                    s(5),
                    s(6),
                    s(7)
                );
                (format!("{head}<{h}>{named}</{h}>{body}"), None)
            }
        }
    }

    proptest! {
        #[test]
        fn generated_envelopes_get_exactly_one_impersonation(
            p in parts(),
            which in 0usize..3,
        ) {
            let (mailbox, mailbox_xml) = [
                ("alice@contoso.com", "alice@contoso.com"),
                ("o'neil&co@example.org", "o'neil&amp;co@example.org"),
                ("j\u{fc}rgen@example.de", "j&#xFC;rgen@example.de"),
            ][which];
            let (body, expected) = build(&p, mailbox, mailbox_xml);
            let got = impersonate(body.as_bytes(), mailbox);
            match expected {
                None => prop_assert_eq!(got, Ok(Impersonation::Unchanged)),
                Some(expected) => {
                    let Ok(Impersonation::Rewritten(out)) = got else {
                        return Err(TestCaseError::fail(format!("{got:?} for {body}")));
                    };
                    // Every byte but the insertion as it was.
                    prop_assert_eq!(String::from_utf8(out.clone()).unwrap(), expected);
                    prop_assert_eq!(impersonations(&out), vec![mailbox.to_owned()]);
                    prop_assert_eq!(impersonate(&out, mailbox), Ok(Impersonation::Unchanged));
                    let other = impersonate(&out, "mallory@example.com");
                    let refused = matches!(other, Err(ImpersonationError::OtherMailbox { .. }));
                    prop_assert!(refused);
                }
            }
        }
    }
}
