//! Request signatures: our narrow profile of RFC 9421 (HTTP Message
//! Signatures) and RFC 9530 (Content-Digest), as SPEC §4 defines it.
//!
//! Pure functions over strings and bytes, with no HTTP framework types, so the
//! sender and the receiver share one implementation that is tested against the
//! RFC vectors. Only the subset of RFC 8941 structured fields these headers use
//! is parsed here; malformed input is refused with a message, never a panic.
//! Time (the skew check) and key lookup belong to the caller.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::ids::KeyId;

pub const LABEL: &str = "sw";
pub const TAG: &str = "scaiwave-v1";
pub const ALG: &str = "ed25519";

const CONTENT_DIGEST: &str = "content-digest";
/// The components every request covers, in the order we sign them.
const REQUIRED: [&str; 5] = [
    "@method",
    "@authority",
    "@path",
    "@query",
    "scaiwave-origin",
];

/// What a signature covers, as the request is actually sent / received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestParts<'a> {
    pub method: &'a str,
    /// The Host header, `host[:port]`; lower-cased when signed.
    pub authority: &'a str,
    /// The raw path as sent, never percent-decoded.
    pub path: &'a str,
    /// The raw query as sent, without the leading `?`.
    pub query: Option<&'a str>,
    /// The `ScaiWave-Origin` header.
    pub origin: &'a str,
    /// The `Content-Digest` header value, if the request has a body.
    pub content_digest: Option<&'a str>,
}

/// The two header values a signed request carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureHeaders {
    pub signature_input: String,
    pub signature: String,
}

/// The `Content-Digest` value of a body: `sha-256=:<base64>:`.
pub fn content_digest(body: &[u8]) -> String {
    format!("sha-256=:{}:", BASE64.encode(Sha256::digest(body)))
}

/// Signs a request; `parts.content_digest` decides whether `content-digest` is covered.
pub fn sign(
    parts: &RequestParts,
    key_id: &KeyId,
    key: &SigningKey,
    created_unix_secs: i64,
) -> SignatureHeaders {
    let mut components = REQUIRED.to_vec();
    components.extend(parts.content_digest.map(|_| CONTENT_DIGEST));
    let list: Vec<String> = components.iter().map(|c| format!("\"{c}\"")).collect();
    let signature_params = format!(
        "({});created={created_unix_secs};keyid=\"{key_id}\";alg=\"{ALG}\";tag=\"{TAG}\"",
        list.join(" ")
    );
    let signature = key.sign(profile_base(&components, &signature_params, parts).as_bytes());
    SignatureHeaders {
        signature_input: format!("{LABEL}={signature_params}"),
        signature: format!("{LABEL}=:{}:", BASE64.encode(signature.to_bytes())),
    }
}

/// A signature that passed step 1 of SPEC §4; it can rebuild its base and verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedSignature {
    pub key_id: KeyId,
    pub created_unix_secs: i64,
    pub signature: [u8; 64],
    /// The covered components, in the order the signer listed them.
    pub components: Vec<String>,
    /// The `sw` member of Signature-Input exactly as received (inner list and
    /// params): the value of the `@signature-params` line, so a signer that
    /// orders its params differently still verifies.
    pub signature_params: String,
}

impl ParsedSignature {
    /// The RFC 9421 §2.5 signature base this signature claims to cover.
    pub fn signature_base(&self, parts: &RequestParts) -> String {
        let names: Vec<&str> = self.components.iter().map(String::as_str).collect();
        profile_base(&names, &self.signature_params, parts)
    }

    /// Step 6 of SPEC §4, with `verify_strict` (SPEC §3).
    pub fn verify(&self, parts: &RequestParts, key: &VerifyingKey) -> Result<()> {
        if self.components.iter().any(|c| c == CONTENT_DIGEST) && parts.content_digest.is_none() {
            return Err(Error::signature(
                "the signature covers content-digest but the request has no Content-Digest; \
                 send Content-Digest with every request that has a body",
            ));
        }
        // A line break in a value could forge another line of the base.
        let mut values = [parts.method, parts.authority, parts.path, parts.origin]
            .into_iter()
            .chain(parts.query)
            .chain(parts.content_digest);
        if values.any(|v| v.contains(['\r', '\n'])) {
            return Err(Error::signature(
                "a signed request component contains CR or LF; send values without line breaks",
            ));
        }
        verify_base(&self.signature_base(parts), &self.signature, key)
    }
}

/// Builds an RFC 9421 §2.5 signature base from (name, value) pairs in order
/// and the serialized `@signature-params` value.
pub(crate) fn signature_base_for(components: &[(String, String)], params_line: &str) -> String {
    let mut base = String::new();
    for (name, value) in components {
        base.push_str(&format!("\"{name}\": {value}\n"));
    }
    base + "\"@signature-params\": " + params_line
}

fn profile_base(components: &[&str], params_line: &str, parts: &RequestParts) -> String {
    let pairs: Vec<(String, String)> = components
        .iter()
        .map(|c| (c.to_string(), component_value(c, parts)))
        .collect();
    signature_base_for(&pairs, params_line)
}

/// The value of one component of the profile (RFC 9421 §2.1, §2.2).
fn component_value(name: &str, parts: &RequestParts) -> String {
    let header = |value: &str| value.trim_matches([' ', '\t']).to_string();
    match name {
        "@method" => parts.method.to_string(),
        "@authority" => parts.authority.trim().to_ascii_lowercase(),
        // RFC 9421 §2.2.6: an empty path is signed as "/".
        "@path" if parts.path.is_empty() => "/".to_string(),
        "@path" => parts.path.to_string(),
        "@query" => format!("?{}", parts.query.unwrap_or("")),
        "scaiwave-origin" => header(parts.origin),
        CONTENT_DIGEST => header(parts.content_digest.unwrap_or("")),
        // parse() admits no other component.
        _ => String::new(),
    }
}

fn verify_base(base: &str, signature: &[u8; 64], key: &VerifyingKey) -> Result<()> {
    let signature = ed25519_dalek::Signature::from_bytes(signature);
    key.verify_strict(base.as_bytes(), &signature).map_err(|_| {
        Error::signature(
            "the request signature does not verify with the origin's key; sign the request as \
             sent (raw path and query, lower-case authority) with the key its descriptor lists",
        )
    })
}

/// Step 1 of SPEC §4: parses and checks Signature-Input and Signature (raw
/// header values; repeated header lines joined with ", ").
pub fn parse(
    signature_input: Option<&str>,
    signature: Option<&str>,
    has_body: bool,
) -> Result<ParsedSignature> {
    let missing = |h: &str| format!("the request has no {h} header; sign it as SPEC §4 says");
    let input = signature_input.ok_or_else(|| Error::signature(missing("Signature-Input")))?;
    let signature = signature.ok_or_else(|| Error::signature(missing("Signature")))?;
    let input = sw_member("Signature-Input", input)?;
    let signature = sw_member("Signature", signature)?;

    let Value::InnerList(items, params) = &input.value else {
        return Err(Error::signature(format!(
            "Signature-Input member {LABEL} is not an inner list; send \
             {LABEL}=(\"@method\" …);created=…;keyid=\"…\";alg=\"{ALG}\";tag=\"{TAG}\""
        )));
    };
    let mut required = REQUIRED.to_vec();
    required.extend(has_body.then_some(CONTENT_DIGEST));
    let mut components: Vec<String> = Vec::new();
    for item in items {
        let (Bare::String(name), true) = (&item.bare, item.params.is_empty()) else {
            return Err(Error::signature(
                "Signature-Input lists a component that is not a plain quoted string; \
                 send names like \"@method\" without parameters",
            ));
        };
        let problem = if components.contains(name) {
            "twice"
        } else if name == CONTENT_DIGEST && !has_body {
            "but the request has no body"
        } else if !required.contains(&name.as_str()) {
            "which this profile does not sign"
        } else {
            components.push(name.clone());
            continue;
        };
        return Err(Error::signature(format!(
            "Signature-Input covers {name:?} {problem}; cover exactly the components of SPEC §4"
        )));
    }
    if let Some(absent) = required
        .iter()
        .find(|r| !components.iter().any(|c| c == *r))
    {
        return Err(Error::signature(format!(
            "Signature-Input does not cover \"{absent}\"; cover every component SPEC §4 requires"
        )));
    }

    // RFC 8941: a repeated parameter takes its last value.
    let param = |key: &str| params.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v);
    let string_param = |key: &str, expected: Option<&str>| -> Result<String> {
        let example = expected.unwrap_or("ed25519:AbCd1234");
        let problem = match param(key) {
            Some(Bare::String(v)) if expected.is_none_or(|e| e == v) => return Ok(v.clone()),
            Some(Bare::String(v)) => format!("has {key}=\"{v}\""),
            Some(_) => format!("parameter {key} is not a quoted string"),
            None => format!("has no {key} parameter"),
        };
        Err(Error::signature(format!(
            "Signature-Input {problem}; send {key}=\"{example}\" as SPEC §4 says"
        )))
    };
    string_param("tag", Some(TAG))?;
    string_param("alg", Some(ALG))?;
    let key_id = string_param("keyid", None)?;
    let key_id = KeyId::parse(&key_id).map_err(|_| {
        Error::signature(format!(
            "Signature-Input keyid {key_id:?} is not a key id; send the key_id of SPEC §2 \
             (ed25519: and 8 base64url characters)"
        ))
    })?;
    let Some(Bare::Integer(created_unix_secs)) = param("created") else {
        return Err(Error::signature(
            "Signature-Input has no integer created parameter; send created=<unix seconds>",
        ));
    };

    let bytes = signature.value.bytes().unwrap_or_default();
    let signature = <[u8; 64]>::try_from(bytes).map_err(|_| {
        Error::signature(format!(
            "Signature member {LABEL} is not a 64-byte Ed25519 signature; \
             send {LABEL}=:<standard padded base64>:"
        ))
    })?;
    Ok(ParsedSignature {
        key_id,
        created_unix_secs: *created_unix_secs,
        signature,
        components,
        signature_params: input.raw.to_string(),
    })
}

/// The one member labelled `sw` of a signature header; other labels are ignored.
fn sw_member<'a>(header: &str, value: &'a str) -> Result<Member<'a>> {
    let members = parse_dictionary(value).map_err(|why| {
        Error::signature(format!(
            "{header} is not a valid RFC 8941 dictionary ({why}); send it as SPEC §4 shows"
        ))
    })?;
    let mut labelled = members.into_iter().filter(|m| m.key == LABEL);
    let problem = match (labelled.next(), labelled.next()) {
        (Some(member), None) => return Ok(member),
        (None, _) => format!("has no member labelled {LABEL}"),
        (Some(_), Some(_)) => format!("has more than one member labelled {LABEL}"),
    };
    Err(Error::signature(format!(
        "{header} {problem}; send exactly one signature labelled {LABEL} as SPEC §4 says"
    )))
}

/// Step 4 of SPEC §4: the `sha-256` member of Content-Digest matches the body.
/// Other algorithms are ignored.
pub fn check_content_digest(header: Option<&str>, body: &[u8]) -> Result<()> {
    if content_digest_sha256(header)? == Sha256::digest(body)[..] {
        return Ok(());
    }
    Err(digest_error("sha-256 does not match the body"))
}

/// The `sha-256` digest a Content-Digest header claims: everything of step
/// 4 that needs no body, so a request can be refused before it is read.
pub(crate) fn content_digest_sha256(header: Option<&str>) -> Result<Vec<u8>> {
    let problem = match header.map(parse_dictionary) {
        None => "is missing".to_string(),
        Some(Err(why)) => format!("is not a valid RFC 8941 dictionary ({why})"),
        // RFC 8941: a repeated key takes its last value.
        Some(Ok(members)) => match members.iter().rev().find(|m| m.key == "sha-256") {
            None => "has no sha-256 member".to_string(),
            Some(member) => match member.value.bytes() {
                Some(digest) => return Ok(digest.to_vec()),
                None => "sha-256 is not a byte sequence".to_string(),
            },
        },
    };
    Err(digest_error(&problem))
}

fn digest_error(problem: &str) -> Error {
    Error::signature(format!(
        "Content-Digest {problem}; send Content-Digest: sha-256=:<base64>: computed over the \
         exact body bytes (RFC 9530, SPEC §4)"
    ))
    .with_reason("digest")
}

// --- RFC 8941 structured fields: the subset these headers use --------------

#[derive(Debug, Clone, PartialEq)]
enum Bare {
    Integer(i64),
    String(String),
    Bytes(Vec<u8>),
    // Checked for well-formedness only; the profile never reads their values.
    Decimal,
    Token,
    Boolean,
}

type Params = Vec<(String, Bare)>;

#[derive(Debug, Clone, PartialEq)]
struct Item {
    bare: Bare,
    params: Params,
}

#[derive(Debug, Clone, PartialEq)]
enum Value {
    Item(Item),
    InnerList(Vec<Item>, Params),
}

impl Value {
    /// The bytes of a byte-sequence item, whatever its parameters.
    fn bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Item(Item {
                bare: Bare::Bytes(bytes),
                ..
            }) => Some(bytes),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Member<'a> {
    key: String,
    value: Value,
    /// The member's value (after `key=`) exactly as received.
    raw: &'a str,
}

/// RFC 8941 §4.2.2, but keeping every member in order, duplicates included
/// (so the caller can refuse two `sw`), with the raw text of each value.
fn parse_dictionary(input: &str) -> std::result::Result<Vec<Member<'_>>, String> {
    let input = input.trim_matches([' ', '\t']);
    let mut p = Parser {
        s: input.as_bytes(),
        pos: 0,
    };
    let mut members = Vec::new();
    while p.pos < p.s.len() {
        let key = p.key()?;
        let has_value = p.eat(b'=');
        let start = p.pos;
        let value = match (has_value, p.peek()) {
            (true, Some(b'(')) => p.inner_list()?,
            (true, _) => Value::Item(p.item()?),
            (false, _) => Value::Item(Item {
                bare: Bare::Boolean,
                params: p.params()?,
            }),
        };
        let raw = input.get(start..p.pos).unwrap_or_default();
        members.push(Member { key, value, raw });
        p.skip_while(|b| b == b' ' || b == b'\t');
        if p.pos == p.s.len() {
            break;
        }
        if !p.eat(b',') {
            return Err(format!("expected ',' at byte {}", p.pos));
        }
        p.skip_while(|b| b == b' ' || b == b'\t');
        if p.pos == p.s.len() {
            return Err("trailing ','".into());
        }
    }
    Ok(members)
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn eat(&mut self, byte: u8) -> bool {
        let hit = self.peek() == Some(byte);
        self.pos += usize::from(hit);
        hit
    }

    /// Advances over bytes matching `f`; returns how many.
    fn skip_while(&mut self, f: impl Fn(u8) -> bool) -> usize {
        let start = self.pos;
        while self.peek().is_some_and(&f) {
            self.pos += 1;
        }
        self.pos - start
    }

    fn key(&mut self) -> std::result::Result<String, String> {
        let start = self.pos;
        if !self
            .peek()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'*')
        {
            return Err(format!("expected a lower-case key at byte {start}"));
        }
        self.skip_while(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.*".contains(&b));
        Ok(String::from_utf8_lossy(&self.s[start..self.pos]).into_owned())
    }

    fn params(&mut self) -> std::result::Result<Params, String> {
        let mut params = Vec::new();
        while self.eat(b';') {
            self.skip_while(|b| b == b' ');
            let key = self.key()?;
            let value = if self.eat(b'=') {
                self.bare()?
            } else {
                Bare::Boolean
            };
            params.push((key, value));
        }
        Ok(params)
    }

    fn item(&mut self) -> std::result::Result<Item, String> {
        let bare = self.bare()?;
        Ok(Item {
            bare,
            params: self.params()?,
        })
    }

    fn inner_list(&mut self) -> std::result::Result<Value, String> {
        self.eat(b'(');
        let mut items = Vec::new();
        loop {
            self.skip_while(|b| b == b' ');
            if self.eat(b')') {
                return Ok(Value::InnerList(items, self.params()?));
            }
            items.push(self.item()?);
            if !matches!(self.peek(), Some(b' ' | b')')) {
                return Err(format!("expected ' ' or ')' at byte {}", self.pos));
            }
        }
    }

    fn bare(&mut self) -> std::result::Result<Bare, String> {
        let at = self.pos;
        match self.peek() {
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b'"') => self.string(),
            Some(b':') => {
                self.pos += 1;
                let len = self.skip_while(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b));
                let encoded = &self.s[self.pos - len..self.pos];
                match (self.eat(b':'), BASE64.decode(encoded)) {
                    (true, Ok(bytes)) => Ok(Bare::Bytes(bytes)),
                    _ => Err(format!("bad byte sequence at byte {at}")),
                }
            }
            Some(b'?') if matches!(self.s.get(at + 1), Some(b'0' | b'1')) => {
                self.pos += 2;
                Ok(Bare::Boolean)
            }
            Some(b) if b.is_ascii_alphabetic() || b == b'*' => {
                self.skip_while(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(&b));
                Ok(Bare::Token)
            }
            _ => Err(format!("expected an item at byte {at}")),
        }
    }

    fn number(&mut self) -> std::result::Result<Bare, String> {
        let at = self.pos;
        let negative = self.eat(b'-');
        let integer_digits = self.skip_while(|b| b.is_ascii_digit());
        if self.eat(b'.') {
            let fraction_digits = self.skip_while(|b| b.is_ascii_digit());
            if !(1..=12).contains(&integer_digits) || !(1..=3).contains(&fraction_digits) {
                return Err(format!("bad decimal at byte {at}"));
            }
            return Ok(Bare::Decimal);
        }
        // At most 15 digits (RFC 8941 §3.3.1), so the parse below cannot overflow.
        let digits = std::str::from_utf8(&self.s[self.pos - integer_digits..self.pos]);
        match (integer_digits, digits.map(str::parse::<i64>)) {
            (1..=15, Ok(Ok(n))) => Ok(Bare::Integer(if negative { -n } else { n })),
            _ => Err(format!("bad integer at byte {at}")),
        }
    }

    fn string(&mut self) -> std::result::Result<Bare, String> {
        let at = self.pos;
        self.pos += 1;
        let mut out = String::new();
        loop {
            let byte = match (self.peek(), self.s.get(self.pos + 1)) {
                (Some(b'"'), _) => {
                    self.pos += 1;
                    return Ok(Bare::String(out));
                }
                (Some(b'\\'), Some(&escaped @ (b'"' | b'\\'))) => {
                    self.pos += 1;
                    escaped
                }
                (Some(b @ 0x20..=0x7e), _) if b != b'\\' => b,
                _ => return Err(format!("bad string starting at byte {at}")),
            };
            out.push(char::from(byte));
            self.pos += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Code;

    const B26: &str = include_str!("../../tests/vectors/rfc9421-b26.txt");
    const RFC9530: &str = include_str!("../../tests/vectors/rfc9530.txt");
    const HELLO: &[u8] = b"{\"hello\": \"world\"}";
    const CREATED: i64 = 1_700_000_000;

    /// The text of `text` between the first `start` and the next `end`.
    fn between<'a>(text: &'a str, start: &str, end: &str) -> &'a str {
        let rest = &text[text.find(start).expect(start) + start.len()..];
        &rest[..rest.find(end).unwrap_or(rest.len())]
    }

    /// The raw Ed25519 key at the end of a PKCS#8 / SPKI DER in a PEM block.
    fn pem_key(label: &str) -> [u8; 32] {
        let body = between(B26, &format!("-----BEGIN {label}-----\n"), "-----END");
        let der = BASE64.decode(body.replace('\n', "")).unwrap();
        der[der.len() - 32..].try_into().unwrap()
    }

    fn key() -> (SigningKey, KeyId) {
        let key = SigningKey::from_bytes(&[7; 32]);
        let key_id = KeyId::derive(&key.verifying_key().to_bytes());
        (key, key_id)
    }

    fn parts<'a>(query: Option<&'a str>, content_digest: Option<&'a str>) -> RequestParts<'a> {
        let (method, authority, origin) = ("PUT", "B.Example.com:8448", "a.example.com");
        let path = "/v1/send/txn%2F1";
        RequestParts {
            method,
            authority,
            path,
            query,
            origin,
            content_digest,
        }
    }

    fn signed(p: &RequestParts) -> SignatureHeaders {
        let (key, key_id) = key();
        sign(p, &key_id, &key, CREATED)
    }

    /// Signature-Input and Signature of a bodiless request, edited by `edit`.
    fn refused(edit: impl Fn(&str) -> String, has_body: bool, needle: &str) {
        let h = signed(&parts(None, None));
        let (input, signature) = (edit(&h.signature_input), edit(&h.signature));
        let err = parse(Some(&input), Some(&signature), has_body).unwrap_err();
        assert!(err.message.contains("; send") || err.message.contains("; cover"));
        says(err, needle);
    }

    fn says(err: Error, needle: &str) {
        assert_eq!(err.code, Code::SignatureMismatch);
        assert!(err.message.contains(needle), "{needle:?} not in {err}");
    }

    fn digest_refused(header: Option<&str>, needle: &str) {
        let err = check_content_digest(header, HELLO).unwrap_err();
        assert_eq!(err.reason, Some("digest"));
        says(err, needle);
    }

    #[test]
    fn rfc9421_b26_base_signature_and_verification() {
        let expected_base = between(B26, "Signature base:\n", "\n\n");
        let members = parse_dictionary(between(B26, "Signature-Input: ", "\n")).unwrap();
        let components: Vec<(String, String)> = (expected_base.lines())
            .filter_map(|line| line.split_once(": "))
            .filter(|(name, _)| *name != "\"@signature-params\"")
            .map(|(name, value)| (name.trim_matches('"').to_string(), value.to_string()))
            .collect();
        let base = signature_base_for(&components, members[0].raw);
        assert_eq!(base, expected_base);

        let key = SigningKey::from_bytes(&pem_key("PRIVATE KEY"));
        let public = VerifyingKey::from_bytes(&pem_key("PUBLIC KEY")).unwrap();
        assert_eq!(key.verifying_key(), public);
        let expected = BASE64
            .decode(between(B26, "Signature: sig-b26=:", ":"))
            .unwrap();
        let expected: [u8; 64] = expected.try_into().unwrap();
        assert_eq!(key.sign(base.as_bytes()).to_bytes(), expected);
        verify_base(&base, &expected, &public).unwrap();
        let mut flipped = expected;
        flipped[10] ^= 1;
        assert!(verify_base(&base, &flipped, &public).is_err());
    }

    #[test]
    fn rfc9530_content_digest() {
        let expected = between(RFC9530, "Content-Digest: ", "\n");
        assert_eq!(content_digest(HELLO), expected);
        check_content_digest(Some(expected), HELLO).unwrap();
    }

    #[test]
    fn sign_then_parse_and_verify_round_trips() {
        let digest = content_digest(HELLO);
        let (key, key_id) = key();
        for (query, body) in [
            (None, None),
            (Some("a=1&b=%2F"), None),
            (None, Some(&*digest)),
        ] {
            let p = parts(query, body);
            let h = signed(&p);
            let parsed = parse(Some(&h.signature_input), Some(&h.signature), body.is_some());
            let parsed = parsed.unwrap();
            assert_eq!(
                (&parsed.key_id, parsed.created_unix_secs),
                (&key_id, CREATED)
            );
            parsed.verify(&p, &key.verifying_key()).unwrap();
            let base = parsed.signature_base(&p);
            assert!(base.contains("\"@authority\": b.example.com:8448\n"));
            assert!(base.contains("\"@path\": /v1/send/txn%2F1\n"));
            assert!(base.contains(&format!("\"@query\": ?{}\n", query.unwrap_or(""))));
            assert_eq!(
                base.contains("\"content-digest\": sha-256=:"),
                body.is_some()
            );
        }
    }

    #[test]
    fn signature_input_follows_the_profile() {
        let h = signed(&parts(None, Some("sha-256=:AAAA:")));
        let components = "\"@method\" \"@authority\" \"@path\" \"@query\" \"scaiwave-origin\"";
        let params = format!(";created={CREATED};keyid=\"{}\";alg=\"ed25519\"", key().1);
        let expected = format!("sw=({components} \"content-digest\"){params};tag=\"scaiwave-v1\"");
        assert_eq!(h.signature_input, expected);
    }

    #[test]
    fn refuses_missing_headers() {
        let h = signed(&parts(None, None));
        says(
            parse(None, Some(&h.signature), false).unwrap_err(),
            "no Signature-Input header",
        );
        says(
            parse(Some(&h.signature_input), None, false).unwrap_err(),
            "no Signature header",
        );
    }

    #[test]
    fn refuses_malformed_dictionaries() {
        for bad in [
            "sw=(\"@method\"",
            "sw=(\"a\")x",
            "sw=1,",
            "SW=1",
            "sw=\"\u{e9}\"",
            "sw=(\"a)",
        ] {
            refused(
                |_| bad.to_string(),
                false,
                "not a valid RFC 8941 dictionary",
            );
        }
    }

    #[test]
    fn refuses_only_other_labels() {
        refused(
            |h| h.replacen("sw=", "other=", 1),
            false,
            "has no member labelled sw",
        );
    }

    #[test]
    fn ignores_other_labels_beside_sw() {
        let h = signed(&parts(None, None));
        let input = format!("x=(\"@method\");created=1, {}", h.signature_input);
        parse(
            Some(&input),
            Some(&format!("{}, x=:AAAA:", h.signature)),
            false,
        )
        .unwrap();
    }

    #[test]
    fn refuses_two_sw_members() {
        refused(
            |h| format!("{h}, {h}"),
            false,
            "more than one member labelled sw",
        );
    }

    #[test]
    fn refuses_wrong_or_missing_tag() {
        refused(
            |h| h.replace("scaiwave-v1", "other"),
            false,
            "has tag=\"other\"",
        );
        refused(
            |h| h.replace(";tag=\"scaiwave-v1\"", ""),
            false,
            "has no tag",
        );
    }

    #[test]
    fn refuses_wrong_alg() {
        refused(
            |h| h.replace("alg=\"ed25519\"", "alg=\"rsa-v1_5-sha256\""),
            false,
            "has alg=",
        );
        refused(
            |h| h.replace("alg=\"ed25519\"", "alg=ed25519"),
            false,
            "not a quoted string",
        );
    }

    #[test]
    fn refuses_missing_or_invalid_keyid() {
        let key_id = key().1;
        refused(
            |h| h.replace(&format!(";keyid=\"{key_id}\""), ""),
            false,
            "has no keyid",
        );
        refused(
            |h| h.replace(key_id.as_str(), "test-key-ed25519"),
            false,
            "is not a key id",
        );
    }

    #[test]
    fn refuses_missing_query_component() {
        refused(
            |h| h.replace(" \"@query\"", ""),
            false,
            "does not cover \"@query\"",
        );
    }

    #[test]
    fn refuses_missing_content_digest_component_when_there_is_a_body() {
        refused(|h| h.to_string(), true, "does not cover \"content-digest\"");
    }

    #[test]
    fn refuses_unknown_repeated_or_bodiless_digest_components() {
        let with = |extra: &'static str| move |h: &str| h.replace("\"@query\"", extra);
        refused(
            with("\"@query\" \"date\""),
            false,
            "which this profile does not sign",
        );
        refused(with("\"@query\" \"@query\""), false, "\"@query\" twice");
        refused(
            with("\"@query\" \"content-digest\""),
            false,
            "the request has no body",
        );
        refused(with("\"@query\";req"), false, "without parameters");
    }

    #[test]
    fn refuses_bad_signature_bytes() {
        let h = signed(&parts(None, None));
        for (bad, needle) in [
            ("sw=:not base64!:", "bad byte sequence"),
            ("sw=:QUJD:", "not a 64-byte Ed25519 signature"),
            ("sw=\"text\"", "not a 64-byte Ed25519 signature"),
        ] {
            let err = parse(Some(&h.signature_input), Some(bad), false).unwrap_err();
            says(err, needle);
        }
    }

    #[test]
    fn refuses_created_that_is_not_an_integer() {
        let created = CREATED.to_string();
        refused(
            |h| h.replace(&created, "\"1700000000\""),
            false,
            "no integer created",
        );
        refused(
            |h| h.replace(&created, "1700000000.5"),
            false,
            "no integer created",
        );
        refused(
            |h| h.replace(&created, "9999999999999999"),
            false,
            "bad integer",
        );
        refused(
            |h| h.replace(&format!(";created={created}"), ""),
            false,
            "no integer created",
        );
    }

    #[test]
    fn refuses_digest_mismatch() {
        digest_refused(
            Some(&content_digest(b"other")),
            "sha-256 does not match the body",
        );
        digest_refused(Some("sha-256=(1)"), "sha-256 is not a byte sequence");
        digest_refused(Some("sha-256=:AA"), "not a valid RFC 8941 dictionary");
    }

    #[test]
    fn refuses_digest_without_sha256_member() {
        digest_refused(Some("sha-512=:AAAA:"), "has no sha-256 member");
        digest_refused(None, "is missing");
    }

    #[test]
    fn ignores_other_digest_algorithms_when_sha256_matches() {
        let header = format!("sha-512=:AAAA:, unixsum=\"x\", {}", content_digest(HELLO));
        check_content_digest(Some(&header), HELLO).unwrap();
    }

    #[test]
    fn tampered_requests_do_not_verify() {
        let (key, _) = key();
        let digest = content_digest(HELLO);
        let p = parts(Some("a=1"), Some(&digest));
        let h = signed(&p);
        let parsed = parse(Some(&h.signature_input), Some(&h.signature), true).unwrap();
        let verify = |edit: fn(&mut RequestParts)| {
            let mut tampered = p;
            edit(&mut tampered);
            parsed.verify(&tampered, &key.verifying_key())
        };
        verify(|_| ()).unwrap();
        assert!(verify(|t| t.path = "/v1/send/txn/1").is_err());
        assert!(verify(|t| t.authority = "c.example.com:8448").is_err());
        assert!(verify(|t| t.query = None).is_err());
        assert!(verify(|t| t.origin = "evil.example.com").is_err());
        assert!(verify(|t| t.method = "put").is_err());
        says(
            verify(|t| t.content_digest = None).unwrap_err(),
            "no Content-Digest",
        );
        says(
            verify(|t| t.origin = "a.example.com\n\"x\": y").unwrap_err(),
            "CR or LF",
        );
        let other_key = SigningKey::from_bytes(&[8; 32]).verifying_key();
        assert!(parsed.verify(&p, &other_key).is_err());
    }

    #[test]
    fn third_party_param_order_verifies() {
        let (key, key_id) = key();
        let p = parts(None, None);
        let names = [
            "scaiwave-origin",
            "@method",
            "@path",
            "@query",
            "@authority",
        ];
        let list: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
        let params = format!(
            "({});keyid=\"{key_id}\";created={CREATED};tag=\"{TAG}\";nonce=\"n1\";alg=\"{ALG}\"",
            list.join(" ")
        );
        let components: Vec<(String, String)> = names
            .iter()
            .map(|n| (n.to_string(), component_value(n, &p)))
            .collect();
        let signature = key.sign(signature_base_for(&components, &params).as_bytes());
        let input = format!("other=(\"@method\");created=1, sw={params}");
        let signature = format!("sw=:{}:", BASE64.encode(signature.to_bytes()));
        let parsed = parse(Some(&input), Some(&signature), false).unwrap();
        assert_eq!(parsed.signature_params, params);
        parsed.verify(&p, &key.verifying_key()).unwrap();
    }

    #[test]
    fn never_panics_on_odd_input() {
        let odd = [
            "", " ", ",", "sw", "sw=", "sw=(", "sw=:", "sw=\"\\", "sw=?", "sw=-", "sw=1.",
        ];
        let odder = [
            "*=",
            "sw=(\"a\" ;)",
            "\u{1F600}=1",
            "sw=(\"@method\")\u{e9}",
            "a=?2;",
        ];
        for s in odd.into_iter().chain(odder) {
            assert!(parse(Some(s), Some(s), true).is_err());
            assert!(check_content_digest(Some(s), b"").is_err());
        }
        // Every truncation of a real header is refused cleanly, never a panic.
        let h = signed(&parts(Some("a=1"), Some(&content_digest(HELLO))));
        for end in 0..h.signature_input.len() {
            assert!(parse(Some(&h.signature_input[..end]), Some(&h.signature), true).is_err());
            assert!(parse(
                Some(&h.signature_input),
                Some(&h.signature[..end.min(5)]),
                true
            )
            .is_err());
        }
    }
}
