//! Strict JSON in, RFC 8785 (JCS) bytes out: the two ends of every signature.
//!
//! Signed content (SPEC §5) must mean the same thing to every implementation,
//! so before anything is verified or stored it is parsed here with the rules
//! that make JCS unambiguous: no duplicate keys (parsers disagree on which
//! copy wins), no floats (number formatting differs between languages) and no
//! integers beyond ±(2^53−1) (a JavaScript peer would silently round them).
//! `serde_json::from_slice` accepts all three, so [`parse_strict`] drives the
//! `serde_json` deserializer with its own visitor that checks while it builds.

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::limits::JSON_INTEGER_ABS_MAX;

/// Parse JSON strictly for signed content: refuse duplicate object keys (at
/// any depth), any float (a number with `.`, `e` or `E`, and also `-0`), any
/// integer outside ±(2^53−1), invalid UTF-8, invalid JSON and trailing
/// characters. Errors are `SW_FED_BAD_EVENT` and name the JSON path.
pub fn parse_strict(bytes: &[u8]) -> Result<Value> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = StrictSeed { path: &Path::Root }
        .deserialize(&mut de)
        .map_err(refusal)?;
    de.end().map_err(refusal)?;
    Ok(value)
}

/// The number rules of [`parse_strict`] for a value that is already parsed
/// (duplicate keys are gone by then and cannot be checked). Used as a second
/// line of defence when a `Value` may not have come through [`parse_strict`].
pub fn check_value(v: &Value) -> Result<()> {
    check_numbers(v, &Path::Root)
}

/// RFC 8785 canonical bytes of `v`.
pub fn canonical_bytes(v: &Value) -> Vec<u8> {
    // A `Value` holds only finite numbers and string keys, which is all JCS
    // can fail on, so an error here is a broken invariant, not bad input.
    serde_jcs::to_vec(v).expect("JCS serialisation of a serde_json::Value cannot fail")
}

/// RFC 8785 canonical bytes of the object `map` without its member `skip`,
/// without copying the object (signing bytes leave out `signatures`).
pub(crate) fn canonical_bytes_without(map: &Map<String, Value>, skip: &str) -> Vec<u8> {
    serde_jcs::to_vec(&Members {
        map,
        skip: Some(skip),
        extra: None,
    })
    .expect("JCS serialisation of a serde_json::Map cannot fail")
}

/// RFC 8785 bytes of the object `map` both with and without its member
/// `key`, for the price of one canonicalisation of the object: an event's
/// hash covers its signatures, what they sign leaves them out.
///
/// Every key of `map` must be ASCII, so that byte order is JCS's UTF-16
/// order (an event's top-level fields are checked against a fixed list
/// before this is called).
pub fn canonical_bytes_with_and_without(map: &Map<String, Value>, key: &str) -> (Vec<u8>, Vec<u8>) {
    debug_assert!(map.keys().all(|k| k.is_ascii()));
    let without = canonical_bytes_without(map, key);
    let Some(value) = map.get(key) else {
        return (without.clone(), without);
    };
    let member = |k: &str, v: &Value| {
        let mut m = serde_jcs::to_vec(k).expect("JCS of a string cannot fail");
        m.push(b':');
        m.extend(serde_jcs::to_vec(v).expect("JCS of a serde_json::Value cannot fail"));
        m
    };
    // `without` is `{` before `,` after `}`; the member goes between the two.
    let mut after = Vec::new();
    for (k, v) in map.iter().filter(|(k, _)| k.as_str() > key) {
        if !after.is_empty() {
            after.push(b',');
        }
        after.extend(member(k, v));
    }
    let inner = without.len() - 2;
    let before_len = match (after.is_empty(), inner == after.len()) {
        (true, _) => inner,
        (false, true) => 0,
        (false, false) => inner - after.len() - 1,
    };
    let mut with = Vec::with_capacity(without.len() + 128);
    with.push(b'{');
    with.extend_from_slice(&without[1..1 + before_len]);
    if before_len > 0 {
        with.push(b',');
    }
    with.extend(member(key, value));
    if !after.is_empty() {
        with.push(b',');
        with.extend(after);
    }
    with.push(b'}');
    (with, without)
}

/// JSON (not canonical) of `map` with one more member, without copying it:
/// how an event goes on the wire with its `unsigned` part.
pub(crate) fn json_bytes_with(map: &Map<String, Value>, key: &str, value: &Value) -> Vec<u8> {
    serde_json::to_vec(&Members {
        map,
        skip: None,
        extra: Some((key, value)),
    })
    .expect("serialising a serde_json::Map cannot fail")
}

/// An object seen through a filter: `map` minus `skip`, plus `extra`
/// (whose key the map must not hold).
struct Members<'a> {
    map: &'a Map<String, Value>,
    skip: Option<&'a str>,
    extra: Option<(&'a str, &'a Value)>,
}

impl serde::Serialize for Members<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        for (k, v) in self.map {
            if Some(k.as_str()) != self.skip {
                m.serialize_entry(k, v)?;
            }
        }
        if let Some((k, v)) = self.extra {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

fn refusal(e: serde_json::Error) -> Error {
    match e.classify() {
        // Our own checks report as `Data`; their message already says what to do.
        serde_json::error::Category::Data => Error::bad_event(format!("refused JSON: {e}")),
        _ => Error::bad_event(format!(
            "invalid JSON: {e}; send one well-formed UTF-8 JSON value with nothing after it"
        )),
    }
}

/// Where in the document we are, for error messages. Built on the stack as
/// the parser descends, so a path costs nothing until an error prints it.
enum Path<'a> {
    Root,
    Key(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Root => f.write_str("$"),
            Path::Key(parent, key) => {
                let plain = !key.is_empty()
                    && key
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                if plain {
                    write!(f, "{parent}.{key}")
                } else {
                    write!(f, "{parent}[{}]", Value::from(*key))
                }
            }
            Path::Index(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

fn integer_refusal(path: &Path<'_>, n: impl fmt::Display) -> String {
    format!(
        "{path}: integer {n} is outside ±(2^53−1) = ±{JSON_INTEGER_ABS_MAX}; \
         signed content only carries integers a double represents exactly, \
         send a smaller number or a string"
    )
}

fn float_refusal(path: &Path<'_>, n: f64) -> String {
    format!(
        "{path}: number {n} is not an integer; floats, exponents, -0 and integers \
         beyond ±(2^53−1) are not allowed in signed content, send an integer or a string"
    )
}

struct StrictSeed<'a> {
    path: &'a Path<'a>,
}

impl<'de> DeserializeSeed<'de> for StrictSeed<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrictSeed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        if v > JSON_INTEGER_ABS_MAX as u64 {
            return Err(E::custom(integer_refusal(self.path, v)));
        }
        Ok(Value::from(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        if !(-JSON_INTEGER_ABS_MAX..=JSON_INTEGER_ABS_MAX).contains(&v) {
            return Err(E::custom(integer_refusal(self.path, v)));
        }
        Ok(Value::from(v))
    }

    // serde_json reports every number written with '.', 'e' or 'E' here, and
    // also `-0` and integers too large for 64 bits: none may be signed.
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Err(E::custom(float_refusal(self.path, v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        loop {
            let path = Path::Index(self.path, out.len());
            match seq.next_element_seed(StrictSeed { path: &path })? {
                Some(v) => out.push(v),
                None => return Ok(Value::Array(out)),
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        // `Map` would silently keep the last copy of a key; the set sees
        // every key as written (after unescaping, so "\u0061" equals "a").
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format!(
                    "{}: duplicate key {}; send each object key once",
                    self.path,
                    Value::from(key.as_str())
                )));
            }
            let path = Path::Key(self.path, &key);
            let value = map.next_value_seed(StrictSeed { path: &path })?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

fn check_numbers(v: &Value, path: &Path<'_>) -> Result<()> {
    match v {
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                if u > JSON_INTEGER_ABS_MAX as u64 {
                    return Err(Error::bad_event(integer_refusal(path, u)));
                }
            } else if let Some(i) = n.as_i64() {
                if i < -JSON_INTEGER_ABS_MAX {
                    return Err(Error::bad_event(integer_refusal(path, i)));
                }
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                return Err(Error::bad_event(float_refusal(path, f)));
            }
            Ok(())
        }
        Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, item)| check_numbers(item, &Path::Index(path, i))),
        Value::Object(map) => map
            .iter()
            .try_for_each(|(k, item)| check_numbers(item, &Path::Key(path, k))),
        Value::Null | Value::Bool(_) | Value::String(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Code;

    macro_rules! jcs_vector {
        ($test:ident, $file:literal) => {
            #[test]
            fn $test() {
                let input: &[u8] = include_bytes!(concat!("../../tests/vectors/jcs/input/", $file));
                let expected: &[u8] =
                    include_bytes!(concat!("../../tests/vectors/jcs/output/", $file));
                let value: Value = serde_json::from_slice(input).unwrap();
                assert_eq!(
                    String::from_utf8_lossy(&canonical_bytes(&value)),
                    String::from_utf8_lossy(expected)
                );
                assert_eq!(canonical_bytes(&value), expected);
            }
        };
    }

    jcs_vector!(jcs_arrays, "arrays.json");
    jcs_vector!(jcs_french, "french.json");
    jcs_vector!(jcs_structures, "structures.json");
    jcs_vector!(jcs_unicode, "unicode.json");
    jcs_vector!(jcs_values, "values.json");
    jcs_vector!(jcs_weird, "weird.json");

    fn refused(input: &str) -> String {
        let e = parse_strict(input.as_bytes()).expect_err(input);
        assert_eq!(e.code, Code::BadEvent, "{input}");
        e.message
    }

    #[test]
    fn accepts_plain_signed_content() {
        let input = br#" {"a": [1, -2, "x", null, true, {"b": {}}],
            "max": 9007199254740991, "min": -9007199254740991} "#;
        let v = parse_strict(input).unwrap();
        assert_eq!(v["max"], Value::from(JSON_INTEGER_ABS_MAX));
        assert_eq!(v["min"], Value::from(-JSON_INTEGER_ABS_MAX));
        assert_eq!(v["a"][5]["b"], Value::Object(Map::new()));
    }

    #[test]
    fn refuses_duplicate_keys_at_any_depth() {
        assert!(refused(r#"{"a": 1, "a": 1}"#).contains("duplicate key \"a\""));
        let m = refused(r#"{"x": [0, {"content": {"b": 1, "b": 2}}]}"#);
        assert!(m.contains("$.x[1].content: duplicate key \"b\""), "{m}");
        // The same key spelled with an escape is still the same key.
        assert!(refused(r#"{"a": 1, "\u0061": 2}"#).contains("duplicate key"));
        // Equal keys in sibling objects are fine.
        assert!(parse_strict(br#"{"p": {"a": 1}, "q": {"a": 1}}"#).is_ok());
    }

    #[test]
    fn refuses_floats() {
        for f in ["1.0", "1e3", "1E3", "-0.5", "[0.1]", "-0"] {
            assert!(refused(f).contains("not an integer"), "{f}");
        }
        let m = refused(r#"{"content": {"n": 2.5}}"#);
        assert!(m.contains("$.content.n"), "{m}");
    }

    #[test]
    fn refuses_integers_beyond_2_pow_53() {
        assert!(refused("9007199254740992").contains("outside"));
        assert!(refused("-9007199254740992").contains("outside"));
        assert!(refused(r#"{"n": 18446744073709551615}"#).contains("$.n"));
        assert!(refused("123456789012345678901234567890").contains("not an integer"));
    }

    #[test]
    fn refuses_trailing_garbage_and_bad_input() {
        assert!(refused(r#"{"a": 1} x"#).contains("invalid JSON"));
        assert!(refused(r#"{"a": 1}{}"#).contains("invalid JSON"));
        assert!(refused("").contains("invalid JSON"));
        assert!(refused(r#"{"a": "\ud800"}"#).contains("invalid JSON"));
        let e = parse_strict(b"{\"a\": \"\xff\"}").unwrap_err();
        assert_eq!(e.code, Code::BadEvent);
    }

    #[test]
    fn check_value_applies_the_number_rules() {
        let v: Value = serde_json::from_str(r#"{"a": [1, {"b": 1.5}]}"#).unwrap();
        let e = check_value(&v).unwrap_err();
        assert!(e.message.contains("$.a[1].b"), "{}", e.message);
        let v: Value = serde_json::from_str(r#"{"a": 9007199254740992}"#).unwrap();
        assert!(check_value(&v).is_err());
        let v: Value = serde_json::from_str(r#"{"a": -9007199254740991, "b": "1.5"}"#).unwrap();
        assert!(check_value(&v).is_ok());
    }

    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(refused(&deep).contains("invalid JSON"));
    }

    #[test]
    fn with_and_without_a_member_equal_two_canonicalisations() {
        let cases = [
            r#"{"content":{"b":1,"a":"\u00e9"},"signatures":{"x":{"k":"s"}},"type":"t"}"#,
            r#"{"signatures":{"x":1}}"#,
            r#"{"a":1,"signatures":[]}"#,
            r#"{"signatures":"s","z":{"y":[1,2]},"zz":null}"#,
            r#"{"a":1,"b":2}"#,
            r#"{}"#,
        ];
        for case in cases {
            let Value::Object(map) = serde_json::from_str::<Value>(case).unwrap() else {
                unreachable!()
            };
            let (with, without) = canonical_bytes_with_and_without(&map, "signatures");
            let mut rest = map.clone();
            rest.remove("signatures");
            assert_eq!(with, canonical_bytes(&Value::Object(map)), "{case}");
            assert_eq!(without, canonical_bytes(&Value::Object(rest)), "{case}");
        }
    }

    #[test]
    fn path_quotes_unusual_keys() {
        let m = refused(r#"{"a b": {"c.d": 1.5}}"#);
        assert!(m.contains(r#"$["a b"]["c.d"]"#), "{m}");
    }
}
