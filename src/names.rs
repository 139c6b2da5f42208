//! Rules for identity names and mailboxes, applied where they enter
//! authswap (`identity add`; any future admin API must call the same
//! functions): a documented character set that is safe in Basic
//! credentials, mail logins, metric labels, logs and terminals; Unicode NFC;
//! no invisible characters; the reserved metrics name `_unknown`; bounded
//! lengths; and the keys under which two names count as the same.
//!
//! Stores written before these rules may hold names outside them: every
//! consumer still copes (metric labels are escaped, [`Shown`] escapes what
//! a terminal would interpret), and `serve` warns about such names.

use crate::metrics::UNKNOWN_IDENTITY;
use std::fmt;
use unicode_normalization::UnicodeNormalization;
use unicode_properties::{GeneralCategory, GeneralCategoryGroup, UnicodeGeneralCategory};

/// Longest identity name, in characters.
pub const MAX_NAME_CHARS: usize = 256;

/// Longest mailbox, in characters (RFC 5321 limits a path to 256 octets
/// including the angle brackets, so an address to 254).
pub const MAX_MAILBOX_CHARS: usize = 254;

/// ASCII characters allowed in names besides letters and digits: those of
/// user principal names, plus `+` (sub-addressing).
pub const NAME_PUNCTUATION: &str = ".-_@+'!#^~";

/// Why a name or mailbox is refused. Messages name the offending character
/// in a form that cannot disturb a terminal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty or longer than [`MAX_NAME_CHARS`].
    #[error("identity name must be 1 to {MAX_NAME_CHARS} characters")]
    NameLength,
    /// A `:` (it separates name and password in Basic credentials).
    #[error("identity name must not contain ':' (Basic authentication separates name and password with it)")]
    Colon,
    /// Spaces, line breaks or control characters.
    #[error("identity name must not contain spaces or control characters")]
    SpaceOrControl,
    /// Zero-width, bidi or other invisible formatting characters.
    #[error("identity name must not contain invisible characters (found {0})")]
    Invisible(String),
    /// Anything else outside the character set.
    #[error("identity name must not contain {0}; use letters, digits and {NAME_PUNCTUATION}", NAME_PUNCTUATION = PUNCTUATION_LIST)]
    Character(String),
    /// `_unknown`, in any case: the metrics label of unknown names.
    #[error(
        "identity name `{UNKNOWN_IDENTITY}` is reserved (it labels unknown names in the metrics)"
    )]
    Reserved,
    /// Not an address, too long, or with spaces or control characters.
    #[error("--mailbox must be an address such as user@contoso.com, at most {MAX_MAILBOX_CHARS} characters, without spaces, control or invisible characters")]
    Mailbox,
}

const PUNCTUATION_LIST: &str = ". - _ @ + ' ! # ^ ~";

/// Default-ignorable code points that are not of category Cf (format) but
/// render as nothing all the same (Unicode's Default_Ignorable_Code_Point).
fn default_ignorable(c: char) -> bool {
    matches!(c,
        '\u{034F}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
        | '\u{180B}'..='\u{180F}' | '\u{2065}' | '\u{3164}'
        | '\u{FE00}'..='\u{FE0F}' | '\u{FFA0}' | '\u{FFF0}'..='\u{FFF8}'
        | '\u{E0000}'..='\u{E0FFF}')
}

/// True for characters that display as nothing: category Cf (zero-width
/// space and joiners, the byte-order mark, bidi controls, soft hyphen, ...)
/// and the other default-ignorable code points.
pub fn is_invisible(c: char) -> bool {
    c.general_category() == GeneralCategory::Format || default_ignorable(c)
}

fn code_point(c: char) -> String {
    format!("U+{:04X}", u32::from(c))
}

/// Trims `name` and brings it to Unicode NFC, the form names are stored in.
pub fn normalize(name: &str) -> String {
    let name = name.trim();
    if unicode_normalization::is_nfc_quick(name.chars()) == unicode_normalization::IsNormalized::Yes
    {
        name.to_owned()
    } else {
        name.nfc().collect()
    }
}

/// The key identities are looked up by: the name trimmed, in NFC, lower
/// case. A client sending the decomposed form of a name finds it too.
pub fn lookup_key(name: &str) -> String {
    normalize(name).to_lowercase()
}

/// The key under which two names count as the same when a name is added:
/// the lookup key without invisible characters, so a name that differs
/// from an existing one only in case, normalisation or invisible characters
/// (possible in stores written before these rules) is refused.
pub fn same_name_key(name: &str) -> String {
    let visible: String = name.chars().filter(|&c| !is_invisible(c)).collect();
    let lower = lookup_key(&visible);
    lower.nfc().collect()
}

/// Checks a new identity name and returns it normalised (trimmed, NFC).
///
/// Allowed: letters, combining marks and digits of any script, and the
/// ASCII characters in [`NAME_PUNCTUATION`]; 1 to [`MAX_NAME_CHARS`]
/// characters; not `_unknown` in any case.
pub fn validate_name(name: &str) -> Result<String, NameError> {
    let name = normalize(name);
    let len = name.chars().count();
    if len == 0 || len > MAX_NAME_CHARS {
        return Err(NameError::NameLength);
    }
    for c in name.chars() {
        if c == ':' {
            return Err(NameError::Colon);
        }
        if c.is_whitespace() || c.is_control() {
            return Err(NameError::SpaceOrControl);
        }
        if is_invisible(c) {
            return Err(NameError::Invisible(code_point(c)));
        }
        if c.is_ascii() {
            if !c.is_ascii_alphanumeric() && !NAME_PUNCTUATION.contains(c) {
                return Err(NameError::Character(format!("'{c}'")));
            }
            continue;
        }
        match c.general_category_group() {
            GeneralCategoryGroup::Letter
            | GeneralCategoryGroup::Mark
            | GeneralCategoryGroup::Number => {}
            _ => return Err(NameError::Character(code_point(c))),
        }
    }
    if lookup_key(&name) == UNKNOWN_IDENTITY {
        return Err(NameError::Reserved);
    }
    Ok(name)
}

/// Checks a mailbox (the user principal name authswap logs in as) and
/// returns it trimmed: `local@domain`, both parts non-empty, at most
/// [`MAX_MAILBOX_CHARS`] characters, no spaces, control or invisible
/// characters.
pub fn validate_mailbox(mailbox: &str) -> Result<String, NameError> {
    let mailbox = mailbox.trim();
    let ok = mailbox.chars().count() <= MAX_MAILBOX_CHARS
        && mailbox
            .rsplit_once('@')
            .is_some_and(|(local, domain)| !local.is_empty() && !domain.is_empty())
        && !mailbox
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || is_invisible(c));
    if ok {
        Ok(mailbox.to_owned())
    } else {
        Err(NameError::Mailbox)
    }
}

/// Displays a stored string (a name, mailbox or error text, possibly from a
/// store written before these rules, or from the identity platform) with
/// control and invisible characters escaped as `\u{..}`, so printing it
/// cannot move the cursor, clear the screen or hide text.
#[derive(Debug, Clone, Copy)]
pub struct Shown<'a>(pub &'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write as _;
        for c in self.0.chars() {
            if c.is_control() || is_invisible(c) {
                write!(f, "\\u{{{:x}}}", u32::from(c))?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

impl Shown<'_> {
    /// Width of the displayed text in characters.
    pub fn chars(&self) -> usize {
        self.0
            .chars()
            .map(|c| {
                if c.is_control() || is_invisible(c) {
                    format!("\\u{{{:x}}}", u32::from(c)).len()
                } else {
                    1
                }
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_character_set() {
        for ok in [
            "scanner",
            "Scanner-01",
            "o'brien@contoso.com",
            "a.b_c+d!e#f^g~h",
            "Müller",
            "δοκιμή",
            "名前",
            "x".repeat(256).as_str(),
        ] {
            assert_eq!(validate_name(ok).as_deref(), Ok(ok), "{ok}");
        }
        assert_eq!(validate_name("  bob  ").as_deref(), Ok("bob"));
        for (bad, err) in [
            ("", NameError::NameLength),
            (&"x".repeat(257), NameError::NameLength),
            ("a:b", NameError::Colon),
            ("a b", NameError::SpaceOrControl),
            ("a\nb", NameError::SpaceOrControl),
            ("a\u{1b}[2J", NameError::SpaceOrControl),
            ("a\u{200b}b", NameError::Invisible("U+200B".into())),
            ("\u{feff}bob", NameError::Invisible("U+FEFF".into())),
            ("bob\u{202e}", NameError::Invisible("U+202E".into())),
            ("a\u{fe0f}", NameError::Invisible("U+FE0F".into())),
            ("a\"b", NameError::Character("'\"'".into())),
            ("a\\b", NameError::Character("'\\'".into())),
            ("a{b}", NameError::Character("'{'".into())),
            ("a,b=c", NameError::Character("','".into())),
            ("a€", NameError::Character("U+20AC".into())),
            ("_unknown", NameError::Reserved),
            ("_UNKNOWN", NameError::Reserved),
        ] {
            assert_eq!(validate_name(bad), Err(err), "{bad:?}");
        }
        assert_eq!(
            NameError::Character("'{'".into()).to_string(),
            "identity name must not contain '{'; use letters, digits and . - _ @ + ' ! # ^ ~"
        );
        assert!(NameError::NameLength.to_string().contains("1 to 256"));
    }

    #[test]
    fn names_are_stored_in_nfc_and_compared_without_invisible_characters() {
        let decomposed = "Rene\u{301}";
        assert_eq!(validate_name(decomposed).unwrap(), "Ren\u{e9}");
        assert_eq!(lookup_key(decomposed), lookup_key("REN\u{c9}"));
        assert_eq!(same_name_key("ali\u{200b}ce"), same_name_key("Alice"));
        assert_eq!(same_name_key("Rene\u{301}"), same_name_key("ren\u{e9}"));
        assert_ne!(same_name_key("alice"), same_name_key("alicia"));
    }

    #[test]
    fn mailboxes() {
        assert_eq!(
            validate_mailbox(" a@contoso.com ").as_deref(),
            Ok("a@contoso.com")
        );
        let long = format!("{}@contoso.com", "a".repeat(242));
        assert_eq!(long.len(), 254);
        assert!(validate_mailbox(&long).is_ok());
        assert!(validate_mailbox(&format!("a{long}")).is_err());
        for bad in [
            "nobody",
            "@contoso.com",
            "a@",
            "a b@c",
            "a@c\nd",
            "a\u{200b}@c",
        ] {
            assert!(validate_mailbox(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn shown_escapes_what_a_terminal_would_interpret() {
        assert_eq!(
            Shown("a\u{1b}[2Jb\u{202e}").to_string(),
            "a\\u{1b}[2Jb\\u{202e}"
        );
        assert_eq!(Shown("Müller").to_string(), "Müller");
        assert_eq!(Shown("a\nb").chars(), "a\\u{a}b".len());
    }
}
