//! Certificate inspection: PEM loading, key/certificate match, validity
//! period, and the client identity header.
//!
//! X.509 is parsed with `x509-parser`, only ever from our own files or from a
//! client certificate that rustls has already verified. The renderings below
//! (RFC 4514 subject, the identity header) are ours, because they are a
//! promise to upstreams that may authorise on them.

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use http::HeaderValue;
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::asn1_rs::Tag;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;
use x509_parser::x509::{AttributeTypeAndValue, X509Name};

use super::provider;

/// Largest PEM file read; a full public CA bundle is about 250 KiB.
const MAX_PEM_BYTES: u64 = 4 << 20;
/// `spillway check` and rotations warn when a certificate expires sooner than this.
pub(crate) const EXPIRY_WARNING_SECS: i64 = 14 * 86_400;

/// Facts read from an X.509 certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct CertInfo {
    /// Serial number, big-endian, as encoded.
    pub serial: Vec<u8>,
    /// Start of the validity period, Unix seconds.
    pub not_before: i64,
    /// End of the validity period, Unix seconds.
    pub not_after: i64,
    /// Subject distinguished name, RFC 4514 string (see [`render_name`]).
    pub subject: String,
    /// DNS names of the subjectAltName extension, in certificate order.
    pub dns: Vec<String>,
    /// URIs of the subjectAltName extension, in certificate order.
    pub uris: Vec<String>,
}

/// A certificate chain with its matching private key.
pub(crate) struct LoadedPair {
    /// What rustls serves or presents.
    pub key: Arc<CertifiedKey>,
    /// The leaf certificate's facts.
    pub info: CertInfo,
}

/// Which file of a certificate/key pair is at fault.
#[derive(Debug)]
pub(crate) enum PairError {
    /// The certificate file (unreadable, not PEM, not X.509, ...).
    Cert(String),
    /// The key file (unreadable, unsupported, not the certificate's key, ...).
    Key(String),
}

impl PairError {
    /// The message, whichever file it is about.
    pub(crate) fn into_message(self) -> String {
        match self {
            PairError::Cert(m) | PairError::Key(m) => m,
        }
    }
}

/// Where a certificate stands against the clock.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Validity {
    /// Valid for at least [`EXPIRY_WARNING_SECS`] more.
    Valid,
    /// Valid, but ends within [`EXPIRY_WARNING_SECS`]: in `days` whole days.
    ExpiresSoon { days: i64 },
    /// Past `not_after` (a certificate is expired *at* `not_after`).
    Expired,
    /// Before `not_before`.
    NotYetValid,
}

// === PEM ===

/// Reads a PEM file (bounded in size). Blocking.
pub(crate) fn read_pem(path: &Path) -> Result<Vec<u8>, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    if meta.len() > MAX_PEM_BYTES {
        return Err(format!(
            "`{}` is {} bytes; a PEM file is limited to {MAX_PEM_BYTES}",
            path.display(),
            meta.len()
        ));
    }
    std::fs::read(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))
}

/// Every `CERTIFICATE` block of a PEM text, at least one.
fn parse_certs(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("`{}` is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "`{}` holds no certificate (expected a `-----BEGIN CERTIFICATE-----` block)",
            path.display()
        ));
    }
    Ok(certs)
}

/// The first private key of a PEM text (PKCS#8, PKCS#1 RSA or SEC1 EC).
fn parse_key(pem: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => format!(
            "`{}` holds no private key (expected a `PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY` block)",
            path.display()
        ),
        other => format!("`{}` is not valid PEM: {other}", path.display()),
    })
}

/// Loads a certificate chain and its key and checks that they belong together.
/// The validity period is the caller's to judge (see [`validity`]). Blocking.
pub(crate) fn load_pair(cert: &Path, key: &Path) -> Result<LoadedPair, PairError> {
    let cert_pem = read_pem(cert).map_err(PairError::Cert)?;
    let key_pem = read_pem(key).map_err(PairError::Key)?;
    pair_from_pem(cert, &cert_pem, key, &key_pem)
}

/// [`load_pair`] on file contents already read (`cert` and `key` name them in messages).
pub(crate) fn pair_from_pem(
    cert: &Path,
    cert_pem: &[u8],
    key: &Path,
    key_pem: &[u8],
) -> Result<LoadedPair, PairError> {
    let chain = parse_certs(cert_pem, cert).map_err(PairError::Cert)?;
    let info = cert_info(&chain[0]).ok_or_else(|| {
        PairError::Cert(format!(
            "the first certificate in `{}` is not a parsable X.509 certificate",
            cert.display()
        ))
    })?;
    let key_der = parse_key(key_pem, key).map_err(PairError::Key)?;
    let signing = provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| {
            PairError::Key(format!(
                "`{}`: unsupported private key ({e}); use RSA, ECDSA P-256/P-384 or Ed25519",
                key.display()
            ))
        })?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(PairError::Key(format!(
                "the private key `{}` does not match the certificate `{}` (their public keys differ)",
                key.display(),
                cert.display()
            )))
        }
        Err(e) => {
            return Err(PairError::Cert(format!(
                "`{}`: cannot check the certificate against its key: {e}",
                cert.display()
            )))
        }
    }
    Ok(LoadedPair {
        key: Arc::new(certified),
        info,
    })
}

/// Loads a CA bundle into a root store; every certificate in it must parse. Blocking.
pub(crate) fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    roots_from_pem(path, &read_pem(path)?)
}

/// [`load_roots`] on file contents already read (`path` names them in messages).
pub(crate) fn roots_from_pem(path: &Path, pem: &[u8]) -> Result<RootCertStore, String> {
    let certs = parse_certs(pem, path)?;
    let mut roots = RootCertStore::empty();
    for (i, c) in certs.into_iter().enumerate() {
        roots.add(c).map_err(|e| {
            format!(
                "certificate #{} in `{}` is not a usable CA certificate: {e}",
                i + 1,
                path.display()
            )
        })?;
    }
    Ok(roots)
}

// === validity ===

/// Where `info` stands at `now` (Unix seconds).
pub(crate) fn validity(info: &CertInfo, now: i64) -> Validity {
    if now >= info.not_after {
        Validity::Expired
    } else if now < info.not_before {
        Validity::NotYetValid
    } else if info.not_after - now < EXPIRY_WARNING_SECS {
        Validity::ExpiresSoon {
            days: (info.not_after - now) / 86_400,
        }
    } else {
        Validity::Valid
    }
}

/// Current Unix time in seconds.
pub(crate) fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `2025-03-01 12:00:00 UTC`; the bare number if `time` cannot represent it.
pub(crate) fn fmt_time(unix: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("{unix} (Unix time)"),
    }
}

/// Serial number as colon-separated hex, as `openssl x509 -serial` shows it.
pub(crate) fn fmt_serial(serial: &[u8]) -> String {
    let trimmed = match serial {
        [0, rest @ ..] if !rest.is_empty() => rest,
        s => s,
    };
    trimmed
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A certificate as `check` judges it: `Err` is an error, `Ok(Some)` a warning.
pub(crate) fn judge_expiry(
    what: &str,
    info: &CertInfo,
    now: i64,
) -> Result<Option<String>, String> {
    match validity(info, now) {
        Validity::Valid => Ok(None),
        Validity::Expired => Err(format!(
            "{what} expired at {} (subject `{}`)",
            fmt_time(info.not_after),
            info.subject
        )),
        Validity::ExpiresSoon { days } => Ok(Some(format!(
            "{what} expires at {} (in {days} day{}): renew it",
            fmt_time(info.not_after),
            if days == 1 { "" } else { "s" }
        ))),
        Validity::NotYetValid => Ok(Some(format!(
            "{what} is not valid before {}: clients will refuse it until then",
            fmt_time(info.not_before)
        ))),
    }
}

// === X.509 ===

/// Reads serial, validity, subject and SANs of a DER certificate.
pub(crate) fn cert_info(der: &[u8]) -> Option<CertInfo> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let validity = cert.validity();
    let mut info = CertInfo {
        serial: cert.raw_serial().to_vec(),
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
        subject: render_name(cert.subject()),
        ..CertInfo::default()
    };
    // A malformed or duplicated extension makes the certificate unparsable for
    // us, as it would for a verifier.
    if let Some(san) = cert.subject_alternative_name().ok()? {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(s) => info.dns.push((*s).to_string()),
                GeneralName::URI(s) => info.uris.push((*s).to_string()),
                _ => {}
            }
        }
    }
    Some(info)
}

/// An X.501 Name as an RFC 4514 string: RDNs last first, joined by `,`; the
/// attributes of a multi-valued RDN joined by `+` in encoded order; well-known
/// attribute types by their short name, others as a dotted OID; string values
/// escaped by [`escape_rdn_value`], values of other ASN.1 types as `#` and
/// the lowercase hex of their content.
pub(crate) fn render_name(name: &X509Name<'_>) -> String {
    let rdns: Vec<String> = name
        .iter_rdn()
        .map(|rdn| {
            rdn.iter()
                .map(render_attribute)
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    rdns.into_iter().rev().collect::<Vec<_>>().join(",")
}

fn render_attribute(atv: &AttributeTypeAndValue<'_>) -> String {
    let oid = atv.attr_type().to_id_string();
    let key = match oid.as_str() {
        "2.5.4.3" => "CN",
        "2.5.4.5" => "serialNumber",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "STREET",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "0.9.2342.19200300.100.1.25" => "DC",
        "0.9.2342.19200300.100.1.1" => "UID",
        other => other,
    };
    let value = atv.attr_value();
    let text = match value.tag() {
        // T61String is taken as UTF-8, as most issuers that use it mean.
        Tag::Utf8String | Tag::PrintableString | Tag::Ia5String | Tag::T61String => {
            String::from_utf8_lossy(value.data).into_owned()
        }
        Tag::BmpString => {
            let units: Vec<u16> = value
                .data
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16_lossy(&units)
        }
        _ => return format!("{key}=#{}", hex(value.data)),
    };
    format!("{key}={}", escape_rdn_value(&text))
}

/// RFC 4514 §2.4 escaping; control, DEL and non-ASCII bytes (UTF-8 included)
/// as `\XX`, so the result is printable ASCII and always a valid header value.
fn escape_rdn_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let n = s.len();
    for (i, b) in s.bytes().enumerate() {
        let special = matches!(b, b'"' | b'+' | b',' | b';' | b'<' | b'>' | b'\\')
            || (i == 0 && (b == b'#' || b == b' '))
            || (i + 1 == n && b == b' ');
        if special {
            out.push('\\');
            out.push(char::from(b));
        } else if b.is_ascii_graphic() || b == b' ' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("\\{b:02X}"));
        }
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

// === client identity header ===

/// The verified client identity, a subset of Envoy's XFCC format:
/// `Subject="CN=web,O=example";URI=spiffe://cluster/ns/app/sa/web;DNS=web.internal`.
///
/// `Subject` always comes first, the RFC 4514 subject in double quotes with
/// `\` and `"` backslash-escaped. Then one `URI=` per URI SAN and one `DNS=`
/// per DNS SAN, in certificate order; a value containing `,` `;` `=` or `"`
/// is double-quoted the same way, and a value with anything but printable
/// ASCII (space and control characters included) is left out. Other SAN kinds
/// (IP addresses, e-mail addresses, otherName, ...) are not part of the
/// header. `None` only if the certificate does not parse.
pub(crate) fn identity_value(leaf: &[u8]) -> Option<HeaderValue> {
    let info = cert_info(leaf)?;
    let mut out = format!("Subject=\"{}\"", quote_escape(&info.subject));
    for (key, values) in [("URI", &info.uris), ("DNS", &info.dns)] {
        for v in values {
            if !v.bytes().all(|b| b.is_ascii_graphic()) {
                continue;
            }
            out.push(';');
            out.push_str(key);
            out.push('=');
            if v.contains([',', ';', '=', '"']) {
                out.push('"');
                out.push_str(&quote_escape(v));
                out.push('"');
            } else {
                out.push_str(v);
            }
        }
    }
    HeaderValue::from_str(&out).ok()
}

fn quote_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate with this subject and these SANs.
    fn cert(
        dn: &[(rcgen::DnType, rcgen::DnValue)],
        sans: Vec<rcgen::SanType>,
    ) -> rcgen::Certificate {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (t, v) in dn {
            params.distinguished_name.push(t.clone(), v.clone());
        }
        params.subject_alt_names = sans;
        params.not_before = rcgen::date_time_ymd(2020, 1, 2);
        params.not_after = rcgen::date_time_ymd(2060, 3, 4);
        let key = rcgen::KeyPair::generate().expect("key");
        params.self_signed(&key).expect("cert")
    }

    fn utf8(s: &str) -> rcgen::DnValue {
        rcgen::DnValue::Utf8String(s.to_string())
    }

    fn ia5(s: &str) -> rcgen::string::Ia5String {
        s.try_into().expect("ia5")
    }

    /// The identity header of `c`, checked to be a valid header value made of
    /// printable ASCII only.
    fn identity(c: &rcgen::Certificate) -> String {
        let v = identity_value(c.der()).expect("a header value");
        let s = v.to_str().expect("visible ASCII").to_string();
        assert!(
            s.bytes().all(|b| b == b' ' || b.is_ascii_graphic()),
            "{s:?}"
        );
        s
    }

    // --- DER for what rcgen cannot make (multi-valued RDNs, odd value types) ---

    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        assert!(content.len() < 128, "short form only");
        let mut v = vec![tag, content.len() as u8];
        v.extend_from_slice(content);
        v
    }

    /// AttributeTypeAndValue with an encoded OID and a value TLV.
    fn atv(oid: &[u8], value: Vec<u8>) -> Vec<u8> {
        let mut c = tlv(0x06, oid);
        c.extend(value);
        tlv(0x30, &c)
    }

    fn name_of(rdns: &[Vec<Vec<u8>>]) -> String {
        let mut seq = Vec::new();
        for rdn in rdns {
            seq.extend(tlv(0x31, &rdn.concat()));
        }
        let der = tlv(0x30, &seq);
        let (rest, name) = X509Name::from_der(&der).expect("a Name");
        assert!(rest.is_empty());
        render_name(&name)
    }

    const CN: &[u8] = &[0x55, 0x04, 0x03];
    const O: &[u8] = &[0x55, 0x04, 0x0A];
    const UID: &[u8] = &[0x09, 0x92, 0x26, 0x89, 0x93, 0xF2, 0x2C, 0x64, 0x01, 0x01];
    const EMAIL: &[u8] = &[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x09, 0x01];

    #[test]
    fn reads_serial_validity_subject_and_sans() {
        let mut params =
            rcgen::CertificateParams::new(vec!["svc.example".to_string()]).expect("params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "web, \"blue\"");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Example");
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://cluster/ns/app/sa/web".try_into().expect("uri"),
        ));
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x01, 0x02, 0x03]));
        params.not_before = rcgen::date_time_ymd(2020, 1, 2);
        params.not_after = rcgen::date_time_ymd(2060, 3, 4);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        let info = cert_info(cert.der()).expect("parses");
        assert_eq!(fmt_serial(&info.serial), "01:02:03");
        // 2020 is a UTCTime, 2060 a GeneralizedTime.
        assert_eq!(fmt_time(info.not_before), "2020-01-02 00:00:00 UTC");
        assert_eq!(fmt_time(info.not_after), "2060-03-04 00:00:00 UTC");
        assert_eq!(info.subject, r#"O=Example,CN=web\, \"blue\""#);
        assert_eq!(info.dns, vec!["svc.example".to_string()]);
        assert_eq!(
            info.uris,
            vec!["spiffe://cluster/ns/app/sa/web".to_string()]
        );
        assert_eq!(
            identity(&cert),
            r#"Subject="O=Example,CN=web\\, \\\"blue\\\"";URI=spiffe://cluster/ns/app/sa/web;DNS=svc.example"#
        );
        assert!(cert_info(&cert.der()[..40]).is_none());
        assert!(identity_value(&cert.der()[..40]).is_none());
    }

    #[test]
    fn the_documented_example() {
        // Issuers list the most significant RDN first; RFC 4514 renders it last.
        let c = cert(
            &[
                (rcgen::DnType::OrganizationName, utf8("example")),
                (rcgen::DnType::CommonName, utf8("web")),
            ],
            vec![
                rcgen::SanType::URI(ia5("spiffe://cluster/ns/app/sa/web")),
                rcgen::SanType::DnsName(ia5("web.internal")),
            ],
        );
        assert_eq!(
            identity(&c),
            r#"Subject="CN=web,O=example";URI=spiffe://cluster/ns/app/sa/web;DNS=web.internal"#
        );
    }

    #[test]
    fn rfc4514_specials_are_escaped_then_quoted_for_the_header() {
        let dc = rcgen::DnType::CustomDnType(vec![0, 9, 2342, 19_200_300, 100, 1, 25]);
        let c = cert(
            &[
                (rcgen::DnType::CountryName, utf8("DE")),
                (rcgen::DnType::OrganizationName, utf8("Acme, Inc.")),
                (
                    rcgen::DnType::OrganizationalUnitName,
                    utf8(r#"R&D "core" \ dept"#),
                ),
                (rcgen::DnType::CommonName, utf8("#web+1=2;x<y> ")),
                (dc, utf8("example")),
                (rcgen::DnType::CustomDnType(vec![1, 2, 3, 4]), utf8("v")),
            ],
            vec![],
        );
        let info = cert_info(c.der()).expect("parses");
        assert_eq!(
            info.subject,
            r#"1.2.3.4=v,DC=example,CN=\#web\+1=2\;x\<y\>\ ,OU=R&D \"core\" \\ dept,O=Acme\, Inc.,C=DE"#
        );
        // `=` needs no escape in an RFC 4514 value; the whole subject is one
        // quoted XFCC value, so `\` and `"` are escaped once more.
        assert_eq!(
            identity(&c),
            r#"Subject="1.2.3.4=v,DC=example,CN=\\#web\\+1=2\\;x\\<y\\>\\ ,OU=R&D \\\"core\\\" \\\\ dept,O=Acme\\, Inc.,C=DE""#
        );
    }

    #[test]
    fn utf8_and_control_characters_become_hex_escapes() {
        let c = cert(
            &[
                (
                    rcgen::DnType::OrganizationName,
                    rcgen::DnValue::BmpString("Ü".try_into().expect("bmp")),
                ),
                (
                    rcgen::DnType::CommonName,
                    utf8(" Zoë 日本\u{7}\t\u{7f}\r\n"),
                ),
            ],
            vec![],
        );
        let info = cert_info(c.der()).expect("parses");
        assert_eq!(
            info.subject,
            r"CN=\ Zo\C3\AB \E6\97\A5\E6\9C\AC\07\09\7F\0D\0A,O=\C3\9C"
        );
        assert_eq!(
            identity(&c),
            r#"Subject="CN=\\ Zo\\C3\\AB \\E6\\97\\A5\\E6\\9C\\AC\\07\\09\\7F\\0D\\0A,O=\\C3\\9C""#
        );
    }

    #[test]
    fn an_empty_subject_is_an_empty_quoted_string() {
        let c = cert(&[], vec![rcgen::SanType::DnsName(ia5("only.example"))]);
        assert_eq!(identity(&c), r#"Subject="";DNS=only.example"#);
    }

    #[test]
    fn multi_valued_rdns_and_non_string_values() {
        let utf = |s: &str| tlv(0x0C, s.as_bytes());
        assert_eq!(
            name_of(&[
                vec![atv(O, utf("Acme"))],
                vec![atv(CN, utf("a+b")), atv(UID, utf("u1"))],
            ]),
            r"CN=a\+b+UID=u1,O=Acme"
        );
        // emailAddress has no short name here; an INTEGER value is hex; an
        // IA5String and a PrintableString are text.
        assert_eq!(
            name_of(&[
                vec![atv(EMAIL, tlv(0x16, b"ops@example.com"))],
                vec![atv(CN, tlv(0x02, &[0x01, 0xFF]))],
                vec![atv(O, tlv(0x13, b"Acme Ltd"))],
            ]),
            r"O=Acme Ltd,CN=#01ff,1.2.840.113549.1.9.1=ops@example.com"
        );
    }

    #[test]
    fn sans_of_every_kind() {
        let other = rcgen::SanType::OtherName((
            vec![1, 3, 6, 1, 4, 1, 311, 20, 2, 3],
            "upn@example.com".into(),
        ));
        let c = cert(
            &[(rcgen::DnType::CommonName, utf8("client"))],
            vec![
                rcgen::SanType::DnsName(ia5("svc.example")),
                rcgen::SanType::IpAddress("192.0.2.1".parse().expect("ip")),
                rcgen::SanType::IpAddress("2001:db8::1".parse().expect("ip")),
                rcgen::SanType::Rfc822Name(ia5("ops@example.com")),
                rcgen::SanType::URI(ia5("spiffe://cluster/ns/app/sa/web")),
                other,
                rcgen::SanType::DnsName(ia5("*.wild.example")),
                // Quoted: these characters separate XFCC fields.
                rcgen::SanType::URI(ia5(r#"https://example.com/a,b;c=d"e"#)),
                // Left out: not printable ASCII.
                rcgen::SanType::URI(ia5("urn:with space")),
                rcgen::SanType::DnsName(ia5("bell\u{7}.example")),
            ],
        );
        let info = cert_info(c.der()).expect("parses");
        assert_eq!(info.dns.len(), 3);
        assert_eq!(info.uris.len(), 3);
        assert_eq!(
            identity(&c),
            r#"Subject="CN=client";URI=spiffe://cluster/ns/app/sa/web;URI="https://example.com/a,b;c=d\"e";DNS=svc.example;DNS=*.wild.example"#
        );
    }

    #[test]
    fn rdn_escaping() {
        assert_eq!(escape_rdn_value("a,b"), "a\\,b");
        assert_eq!(escape_rdn_value(" x "), "\\ x\\ ");
        assert_eq!(escape_rdn_value("#a#"), "\\#a#");
        assert_eq!(escape_rdn_value("a=b"), "a=b");
        assert_eq!(escape_rdn_value("é"), "\\C3\\A9");
        assert_eq!(escape_rdn_value(""), "");
        for s in ["a\u{1}b\"c", "\u{0}", "x\u{85}y", "\u{feff}"] {
            assert!(HeaderValue::from_str(&escape_rdn_value(s)).is_ok(), "{s:?}");
        }
    }

    fn info(not_before: i64, not_after: i64) -> CertInfo {
        CertInfo {
            not_before,
            not_after,
            subject: "CN=x".into(),
            ..CertInfo::default()
        }
    }

    #[test]
    fn validity_boundaries() {
        let day = 86_400;
        let i = info(1_000 * day, 2_000 * day);
        assert_eq!(validity(&i, 1_000 * day - 1), Validity::NotYetValid);
        assert_eq!(validity(&i, 1_000 * day), Validity::Valid);
        assert_eq!(
            validity(&i, 2_000 * day - EXPIRY_WARNING_SECS),
            Validity::Valid
        );
        assert_eq!(
            validity(&i, 2_000 * day - EXPIRY_WARNING_SECS + 1),
            Validity::ExpiresSoon { days: 13 }
        );
        assert_eq!(
            validity(&i, 2_000 * day - 3 * day - 5),
            Validity::ExpiresSoon { days: 3 }
        );
        assert_eq!(
            validity(&i, 2_000 * day - 1),
            Validity::ExpiresSoon { days: 0 }
        );
        assert_eq!(validity(&i, 2_000 * day), Validity::Expired);
        // Ends before it starts: expired, whatever the clock.
        assert_eq!(validity(&info(10, 5), 7), Validity::Expired);
    }

    #[test]
    fn expiry_judgement() {
        let day = 86_400;
        // 2000-02-29 00:00:00 UTC: a leap day.
        let end = 951_782_400;
        let i = info(end - 400 * day, end);
        let what = "certificate `a.crt`";
        assert_eq!(judge_expiry(what, &i, end - 100 * day), Ok(None));
        assert_eq!(
            judge_expiry(what, &i, end - 5 * day),
            Ok(Some(
                "certificate `a.crt` expires at 2000-02-29 00:00:00 UTC (in 5 days): renew it"
                    .into()
            ))
        );
        assert_eq!(
            judge_expiry(what, &i, end - day - 1),
            Ok(Some(
                "certificate `a.crt` expires at 2000-02-29 00:00:00 UTC (in 1 day): renew it"
                    .into()
            ))
        );
        assert_eq!(
            judge_expiry(what, &i, end),
            Err("certificate `a.crt` expired at 2000-02-29 00:00:00 UTC (subject `CN=x`)".into())
        );
        let w = judge_expiry(what, &i, end - 500 * day).expect("a warning, not an error");
        assert_eq!(
            w.as_deref(),
            Some("certificate `a.crt` is not valid before 1999-01-25 00:00:00 UTC: clients will refuse it until then")
        );
    }

    #[test]
    fn times_and_serials_render() {
        assert_eq!(fmt_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(fmt_time(-1), "1969-12-31 23:59:59 UTC");
        assert_eq!(fmt_time(951_868_799), "2000-02-29 23:59:59 UTC");
        assert_eq!(fmt_time(i64::MAX), format!("{} (Unix time)", i64::MAX));
        assert_eq!(fmt_serial(&[0x00, 0x8f, 0x01]), "8f:01");
        assert_eq!(fmt_serial(&[0x00]), "00");
    }

    #[test]
    fn certificate_validity_comes_from_the_certificate() {
        let c = cert(&[(rcgen::DnType::CommonName, utf8("x"))], vec![]);
        let i = cert_info(c.der()).expect("parses");
        // 2020-01-02 and 2060-03-04, midnight UTC.
        assert_eq!(i.not_before, 1_577_923_200);
        assert_eq!(i.not_after, 2_845_584_000);
        assert_eq!(validity(&i, now_unix()), Validity::Valid);
    }
}
