//! EWS operation names, for planning the EWS retirement in Exchange Online:
//! which SOAP operation (the first child element of the envelope's `Body`)
//! an EWS request calls, from a bounded set of known names plus `other`,
//! found by a bounded, non-allocating scan of the buffered request body.

use prometheus_client::encoding::EncodeLabelValue;
use quick_xml::events::Event;
use quick_xml::reader::Reader;

/// How much of a body is scanned for the operation. The operation element
/// follows the SOAP header, which is small in EWS requests.
pub const SCAN_LIMIT: usize = 16 * 1024;

macro_rules! operations {
    ($($name:ident),* $(,)?) => {
        /// A known EWS operation, or `other`.
        #[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
        #[allow(non_camel_case_types)]
        pub enum Operation {
            $(
                #[allow(missing_docs)]
                $name,
            )*
            /// Not a known operation, not a SOAP envelope, or a body too
            /// large to be held (streamed without a look).
            other,
        }

        impl Operation {
            /// Every operation, `other` last (indexed by discriminant).
            pub const ALL: [Operation; [$(stringify!($name)),*].len() + 1] =
                [$(Operation::$name,)* Operation::other];

            /// The label value.
            pub fn name(self) -> &'static str {
                match self {
                    $(Operation::$name => stringify!($name),)*
                    Operation::other => "other",
                }
            }

            /// The operation an element's local name calls.
            pub fn from_name(local: &[u8]) -> Operation {
                $(
                    if local == stringify!($name).as_bytes() {
                        return Operation::$name;
                    }
                )*
                Operation::other
            }
        }
    };
}

operations!(
    FindItem,
    GetItem,
    CreateItem,
    UpdateItem,
    DeleteItem,
    SendItem,
    MoveItem,
    CopyItem,
    ArchiveItem,
    MarkAsJunk,
    MarkAllItemsAsRead,
    UploadItems,
    ExportItems,
    FindFolder,
    GetFolder,
    CreateFolder,
    CreateFolderPath,
    UpdateFolder,
    DeleteFolder,
    EmptyFolder,
    MoveFolder,
    CopyFolder,
    SyncFolderItems,
    SyncFolderHierarchy,
    GetAttachment,
    CreateAttachment,
    DeleteAttachment,
    ResolveNames,
    ExpandDL,
    FindPeople,
    GetPersona,
    FindConversation,
    GetConversationItems,
    ApplyConversationAction,
    GetUserAvailability,
    GetUserOofSettings,
    SetUserOofSettings,
    GetMailTips,
    GetRoomLists,
    GetRooms,
    GetUserPhoto,
    Subscribe,
    Unsubscribe,
    GetEvents,
    GetStreamingEvents,
    GetServerTimeZones,
    ConvertId,
    GetDelegate,
    AddDelegate,
    UpdateDelegate,
    RemoveDelegate,
    GetInboxRules,
    UpdateInboxRules,
    GetUserConfiguration,
    CreateUserConfiguration,
    UpdateUserConfiguration,
    DeleteUserConfiguration,
    GetSharingMetadata,
    GetSharingFolder,
    GetPasswordExpirationDate,
    GetServiceConfiguration,
    GetAppManifests,
    GetUserRetentionPolicyTags,
);

/// Whether a request target is the EWS endpoint (`…/EWS/Exchange.asmx`,
/// any case, query ignored).
pub fn is_ews_path(path: &str) -> bool {
    let path = path.split('?').next().unwrap_or_default();
    ends_with_ignore_case(path, "/exchange.asmx")
}

fn ends_with_ignore_case(s: &str, suffix: &str) -> bool {
    s.len() >= suffix.len()
        && s.as_bytes()[s.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
}

/// The operation a SOAP request body calls: the local name of the first
/// element inside the envelope's `Body` (at depth 2 under the root), from
/// at most [`SCAN_LIMIT`] bytes.
pub fn operation(body: &[u8]) -> Operation {
    let mut reader = Reader::from_reader(&body[..body.len().min(SCAN_LIMIT)]);
    let mut depth = 0usize;
    let mut in_body = false;
    // Bounded by the input: every event consumes bytes.
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) => {
                depth += 1;
                let local = e.local_name();
                if in_body {
                    return Operation::from_name(local.as_ref());
                }
                if depth == 2 && local.as_ref() == b"Body" {
                    in_body = true;
                }
            }
            Ok(Event::Empty(e)) => {
                if in_body {
                    return Operation::from_name(e.local_name().as_ref());
                }
            }
            Ok(Event::End(_)) => {
                if in_body || depth == 0 {
                    return Operation::other;
                }
                depth -= 1;
            }
            Ok(Event::Eof) | Err(_) => return Operation::other,
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{is_ews_path, operation, Operation};

    #[test]
    fn the_first_element_in_the_body_names_the_operation() {
        let env = |body: &str| {
            format!(
                r#"<?xml version="1.0" encoding="utf-8"?>
<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/" xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages" xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types">
  <soap:Header><t:RequestServerVersion Version="Exchange2016"/><!-- <m:GetItem> --></soap:Header>
  <soap:Body>{body}</soap:Body>
</soap:Envelope>"#
            )
        };
        assert_eq!(
            operation(
                env("<m:FindItem Traversal=\"Shallow\"><m:ItemShape/></m:FindItem>").as_bytes()
            ),
            Operation::FindItem
        );
        assert_eq!(
            operation(env("\n  <!-- c --><GetFolder xmlns=\"x\"/>").as_bytes()),
            Operation::GetFolder
        );
        assert_eq!(
            operation(env("<m:SyncFolderItems/>").as_bytes()),
            Operation::SyncFolderItems
        );
        assert_eq!(
            operation(env("<m:Frobnicate/>").as_bytes()),
            Operation::other
        );
        assert_eq!(operation(env("").as_bytes()), Operation::other);
        assert_eq!(operation(b"not xml at all"), Operation::other);
        assert_eq!(operation(b""), Operation::other);
        // An operation past the scan limit is not looked for.
        let long = env(&format!("<m:GetItem/>{}", " ".repeat(20_000)));
        assert_eq!(operation(long.as_bytes()), Operation::GetItem);
        let late = env(&format!("{}<m:GetItem/>", " ".repeat(20_000)));
        assert_eq!(operation(late.as_bytes()), Operation::other);
        assert_eq!(Operation::ALL.last(), Some(&Operation::other));
        assert_eq!(Operation::other as usize, Operation::ALL.len() - 1);
    }

    #[test]
    fn ews_paths() {
        assert!(is_ews_path("/EWS/Exchange.asmx"));
        assert!(is_ews_path("/ews/exchange.asmx?x=1"));
        assert!(!is_ews_path("/autodiscover/autodiscover.xml"));
        assert!(!is_ews_path("/"));
    }
}
