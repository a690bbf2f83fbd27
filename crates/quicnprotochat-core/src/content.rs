//! What an application message carries, inside its MLS encryption: a
//! one-byte content type, then the body. The node never sees it; clients
//! of any language agree on it through docs/protocol.md.
//!
//! - `0x01` text: UTF-8 text for people.
//! - `0x02` group-name: the group's name for people, UTF-8, 1 to
//!   [`Content::MAX_NAME_LEN`] bytes. Group ids are random, so a name lives
//!   only with the members: an inviter sends it in the epoch its Commit
//!   starts, where only the members of that epoch can read it.
//!
//! Clients before content types sent bare UTF-8 text. Such a message
//! starts with a printable character (a byte of 0x20 or more), which no
//! content type is, so it still reads as text.

/// The content of one application message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// Text for people.
    Text(String),
    /// The group's name.
    GroupName(String),
    /// A content type this client does not know, or a body its type does
    /// not allow (a name that is not UTF-8, say): shown as such, never as
    /// text.
    Unreadable {
        /// The message's first byte.
        content_type: u8,
    },
}

impl Content {
    /// Content type of [`Content::Text`].
    pub const TEXT: u8 = 0x01;
    /// Content type of [`Content::GroupName`].
    pub const GROUP_NAME: u8 = 0x02;
    /// The longest group name, in bytes: a name is for people to read.
    pub const MAX_NAME_LEN: usize = 256;

    /// The plaintext to encrypt: the content type, then the body.
    pub fn encode(&self) -> Vec<u8> {
        let (content_type, body) = match self {
            Content::Text(text) => (Self::TEXT, text.as_bytes()),
            Content::GroupName(name) => (Self::GROUP_NAME, name.as_bytes()),
            Content::Unreadable { content_type } => (*content_type, &[][..]),
        };
        let mut plaintext = Vec::with_capacity(1 + body.len());
        plaintext.push(content_type);
        plaintext.extend_from_slice(body);
        plaintext
    }

    /// Reads a decrypted application message. Never fails: what cannot be
    /// read is [`Content::Unreadable`].
    pub fn decode(plaintext: &[u8]) -> Content {
        let Some((&content_type, body)) = plaintext.split_first() else {
            // An empty message from a client before content types.
            return Content::Text(String::new());
        };
        let unreadable = Content::Unreadable { content_type };
        match content_type {
            Self::TEXT => std::str::from_utf8(body).map_or(unreadable, |text| Content::Text(text.to_owned())),
            Self::GROUP_NAME => match std::str::from_utf8(body) {
                Ok(name) if !name.is_empty() && name.len() <= Self::MAX_NAME_LEN => {
                    Content::GroupName(name.to_owned())
                }
                _ => unreadable,
            },
            // Bare text from a client before content types.
            0x20.. => Content::Text(String::from_utf8_lossy(plaintext).into_owned()),
            _ => unreadable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_content_reads_back_as_written() {
        for content in [
            Content::Text("hello".into()),
            Content::Text(String::new()),
            Content::Text("\u{1}starts with a control byte".into()),
            Content::GroupName("secret-union-meeting".into()),
            Content::GroupName("x".repeat(Content::MAX_NAME_LEN)),
        ] {
            assert_eq!(Content::decode(&content.encode()), content);
        }
        assert_eq!(Content::Text("hi".into()).encode(), b"\x01hi");
        assert_eq!(Content::GroupName("g".into()).encode(), b"\x02g");
    }

    #[test]
    fn bare_text_from_older_clients_is_text() {
        assert_eq!(Content::decode(b"hello"), Content::Text("hello".into()));
        assert_eq!(Content::decode("über".as_bytes()), Content::Text("über".into()));
        assert_eq!(Content::decode(b""), Content::Text(String::new()));
    }

    #[test]
    fn what_cannot_be_read_is_never_text_or_a_name() {
        assert_eq!(
            Content::decode(b"\x07bell"),
            Content::Unreadable { content_type: 7 }
        );
        assert_eq!(Content::decode(b"\x00"), Content::Unreadable { content_type: 0 });
        assert_eq!(
            Content::decode(b"\x01\xff"),
            Content::Unreadable { content_type: 1 }
        );
        assert_eq!(Content::decode(b"\x02"), Content::Unreadable { content_type: 2 });
        assert_eq!(
            Content::decode(b"\x02\xc3"),
            Content::Unreadable { content_type: 2 }
        );
        let long = Content::GroupName("x".repeat(Content::MAX_NAME_LEN + 1)).encode();
        assert_eq!(Content::decode(&long), Content::Unreadable { content_type: 2 });
    }
}
