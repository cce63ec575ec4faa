//! Tidy: the crate's layering, checked from the source text (no build, no
//! dependencies; in the style of rust-analyzer's `tests/tidy.rs`).
//!
//! Each check maps `(path under src/, source)` pairs to `file:line: text`
//! violations. The rule tests run the checks on `src/`, and
//! `the_rules_catch_a_bad_file` runs them on bad samples, so that no rule
//! can pass by checking nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::{fs, path::Path};

/// The layers, lowest first: a module may name only modules of its own layer
/// or below. This must agree with ARCHITECTURE.md's layer diagram: change
/// both together.
#[rustfmt::skip]
const LAYERS: &[(&str, u8)] = &[
    ("error", 0), ("ids", 0), ("limits", 0), ("clock", 0), ("config", 0), ("tls", 0),
    ("metrics", 0),
    ("protocol", 1),
    ("storage", 2),
    ("federation", 3),
    ("rooms", 4),
    ("delivery", 5),
    ("api", 6),
    ("app", 7), ("server", 7),
    ("cli", 8),
];

/// A source file: its path under `src/` (with `/`), and its text.
type File = (String, String);

/// One `#[test]` per rule: run its check and, on failure, list every
/// violation and say what to do about it.
macro_rules! rules {
    ($($test:ident: $check:ident($files:ident), $what_to_do:literal;)*) => {$(
        #[test]
        fn $test() {
            let violations = $check(&$files());
            let (n, list) = (violations.len(), violations.join("\n"));
            assert!(n == 0, "\n{list}\n\n{n} violation(s). {}\n", $what_to_do);
        }
    )*};
}

rules! {
    modules_import_only_their_layer_and_below: check_layers(layered),
        "A module may name only modules of its own layer or below (LAYERS): move the \
         code down, or pass it in from above as a value or a trait. For a module not \
         in LAYERS, add it to LAYERS and to ARCHITECTURE.md.";
    no_import_cycle_between_top_level_modules: check_cycles(layered),
        "Top-level modules must form a DAG: move what both sides need into one of \
         them, or below both.";
    federation_knows_no_rooms: check_federation(layered),
        "federation/ talks to peers; it must not know rooms: take what it needs as \
         plain data, or as a trait that a higher layer implements.";
    app_is_named_only_at_the_top: check_app(layered),
        "`App` is the whole server, at layer 7: below it, take the parts you need \
         (Store, Clock, Config, ...) as arguments.";
    sled_only_in_storage: check_sled(layered),
        "Only storage/ touches sled: add a typed function to storage/ and call that.";
    http_stacks_only_in_their_modules: check_http_stacks(layered),
        "warp belongs in api/, hyper in api/ and federation/client.rs: keep HTTP \
         there and pass plain types across.";
    rooms_know_nothing_of_http: check_rooms(layered),
        "rooms/ is room logic, not HTTP: return an `Error` with a `Code` and let \
         api/ turn it into a status, a route or a URL.";
    every_file_has_a_module_doc: check_module_docs(read_src),
        "Start the file with a `//!` comment saying what it is for.";
}

#[test]
fn the_scanner_strips_comments_and_strings() {
    let src = r##"//! crate::rooms in a doc
// crate::rooms in a comment /* not a block
/* crate::rooms /* nested */ crate::rooms */
fn f<'a>(x: &'a str) -> char {
    let _ = "crate::rooms \" crate::rooms
        crate::rooms";
    let _ = (r#"crate::rooms " crate::rooms"#, br"crate::rooms", b"crate::rooms");
    let _ = ['"', '\'', '\u{1F600}', b'"'];
    crate::ids::parse(x).unwrap_or(r#type::crate_x)
}
use crate::{a::{B,
    C}, d, self};
"##;
    let code = strip(src);
    assert_eq!(code.lines().count(), src.lines().count(), "lines are kept");
    assert!(code.contains("fn f<'a>(x: &'a str)"), "lifetimes are code");
    let paths: Vec<_> = crate_paths(&code).into_iter().collect();
    let want = [(9, "ids"), (11, "a"), (12, "d")].map(|(l, m)| (l, m.to_string()));
    assert_eq!(paths, want);

    // Whole words only, and never inside strings.
    let code = strip(r#"let s: AppState = MyApp::new(App, sledge, "sled App");"#);
    assert_eq!(lines_naming(&code, "App"), [1]);
    assert_eq!(lines_naming(&code, "sled"), Vec::<usize>::new());
    assert_eq!(lines_naming("let http = 1;", "http::"), Vec::<usize>::new());
    assert_eq!(lines_naming("use http::Method;", "http::"), [1]);
}

/// Files that break each rule once, and files that break none; `@@ path`
/// starts each one.
const BAD: &str = "@@ ids.rs
//! Layer 0 naming layer 2.
use crate::storage::Store;
@@ config.rs
//! config -> tls -> config: both layer 0, but a cycle.
use crate::tls::Roots;
@@ tls.rs
//! T.
fn f() {
    crate::config::load();
}
@@ federation/inbound.rs
//! F.
use crate::{ids::Id,
    rooms::host};
@@ federation/client.rs
//! hyper is fine here, warp is not.
use hyper::Request;
use warp::Reply;
@@ rooms/host.rs
//! H.
fn f(a: &App) -> http::StatusCode {}
@@ rooms/mod.rs
//! Not hyper, not warp, not App: comments do not count.
fn f(t: sled::Tree, m: MyApp) -> &str { \"App\" }
use crate::nosuch;
@@ storage/mod.rs
//! S.
fn f(t: sled::Tree, b: hyper_util::Body) {}
@@ api/mod.rs
//! A.
use warp::Filter;
use hyper::Body;
@@ app.rs
//! A.
pub struct App;
@@ newmod.rs
fn f() {}
";

#[test]
fn the_rules_catch_a_bad_file() {
    let mut bad: Vec<File> = Vec::new();
    for line in BAD.lines() {
        match line.strip_prefix("@@ ") {
            Some(path) => bad.push((path.to_string(), String::new())),
            None => bad.last_mut().unwrap().1 += &format!("{line}\n"),
        }
    }
    // Where the violations are: `src/a.rs:3: text` gives `a.rs:3`.
    let wheres = |violations: Vec<String>| {
        let heads = violations.iter().map(|v| v.lines().next().unwrap_or(v));
        let mut at: Vec<_> = heads.map(|v| v.split(": ").next().unwrap_or(v)).collect();
        at.sort();
        at.join(" ").replace("src/", "")
    };
    let layers = "federation/inbound.rs:3 ids.rs:2 newmod.rs:1 rooms/mod.rs:3";
    assert_eq!(wheres(check_layers(&bad)), layers);
    assert_eq!(wheres(check_cycles(&bad)), "config -> tls -> config");
    assert_eq!(wheres(check_federation(&bad)), "federation/inbound.rs:3");
    assert_eq!(wheres(check_app(&bad)), "rooms/host.rs:2");
    assert_eq!(wheres(check_sled(&bad)), "rooms/mod.rs:2");
    let http = "federation/client.rs:3 storage/mod.rs:2";
    assert_eq!(wheres(check_http_stacks(&bad)), http);
    assert_eq!(wheres(check_rooms(&bad)), "rooms/host.rs:2");
    assert_eq!(wheres(check_module_docs(&bad)), "newmod.rs:1");
}

fn check_layers(files: &[File]) -> Vec<String> {
    let mut out = Vec::new();
    for (path, src) in files {
        let me = top(path);
        let Some(mine) = layer(me) else {
            out.push(format!("src/{path}:1: module `{me}` is not in LAYERS"));
            continue;
        };
        for (line, to) in crate_paths(&strip(src)) {
            let why = match layer(&to) {
                None => format!("`{to}` is not in LAYERS"),
                Some(theirs) if theirs > mine => format!("{me} is {mine}, {to} is {theirs}"),
                Some(_) => continue,
            };
            out.push(format!("{}  [{why}]", at(path, src, line)));
        }
    }
    out
}

/// Each cycle that some edge closes (by the shortest way back), printed as
/// `a -> b -> a` with an example `file:line` for each edge.
fn check_cycles(files: &[File]) -> Vec<String> {
    let mut edges: BTreeMap<(&str, String), String> = BTreeMap::new();
    for (path, src) in files {
        for (line, to) in crate_paths(&strip(src)) {
            if to != top(path) {
                let example = at(path, src, line);
                edges.entry((top(path), to)).or_insert(example);
            }
        }
    }
    let mut cycles = BTreeSet::new();
    for (from, to) in edges.keys() {
        if let Some(mut cycle) = shortest_path(&edges, to, from) {
            let first = (0..cycle.len()).min_by_key(|&i| cycle[i]).unwrap_or(0);
            cycle.rotate_left(first); // the same cycle, whichever edge found it
            cycles.insert(cycle);
        }
    }
    let show = |mut cycle: Vec<&str>| {
        cycle.push(cycle[0]);
        let mut shown = cycle.join(" -> ");
        for w in cycle.windows(2) {
            let example = &edges[&(w[0], w[1].to_string())];
            shown += &format!("\n    {} -> {}: {example}", w[0], w[1]);
        }
        shown
    };
    cycles.into_iter().map(show).collect()
}

/// The shortest path `from` .. `to` along `edges`, both ends included.
fn shortest_path<'a>(
    edges: &'a BTreeMap<(&str, String), String>,
    from: &'a str,
    to: &str,
) -> Option<Vec<&'a str>> {
    let (mut paths, mut seen) = (vec![vec![from]], BTreeSet::from([from]));
    while !paths.is_empty() {
        let mut longer = Vec::new();
        for path in paths {
            let last = path[path.len() - 1];
            if last == to {
                return Some(path);
            }
            let next = edges.keys().filter(|(a, _)| *a == last);
            for (_, n) in next.filter(|(_, n)| seen.insert(n)) {
                longer.push([&path[..], &[n.as_str()]].concat());
            }
        }
        paths = longer;
    }
    None
}

fn check_federation(files: &[File]) -> Vec<String> {
    let above = "crate::rooms crate::delivery crate::api crate::app";
    naming(files, |p| p.starts_with("federation/"), above)
}

fn check_app(files: &[File]) -> Vec<String> {
    naming(files, |p| layer(top(p)).is_none_or(|l| l < 7), "App")
}

fn check_sled(files: &[File]) -> Vec<String> {
    naming(files, |p| !p.starts_with("storage/"), "sled")
}

fn check_http_stacks(files: &[File]) -> Vec<String> {
    let outside_api = |p: &str| !p.starts_with("api/");
    let mut out = naming(files, outside_api, "warp");
    let no_hyper = |p: &str| outside_api(p) && p != "federation/client.rs";
    out.extend(naming(files, no_hyper, "hyper hyper_util"));
    out
}

fn check_rooms(files: &[File]) -> Vec<String> {
    let http = "http:: hyper warp StatusCode crate::api";
    naming(files, |p| p.starts_with("rooms/"), http)
}

fn check_module_docs(files: &[File]) -> Vec<String> {
    let undocumented = files
        .iter()
        .filter(|(_, src)| !src.trim_start().starts_with("//!"));
    let undocumented = undocumented.map(|(path, _)| format!("src/{path}:1: no `//!` doc"));
    undocumented.collect()
}

/// Each line, in files where `applies(path)`, whose code names one of the
/// space-separated `names`.
fn naming(files: &[File], applies: impl Fn(&str) -> bool, names: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (path, src) in files.iter().filter(|(path, _)| applies(path)) {
        let code = strip(src);
        let lines = names.split(' ').flat_map(|name| lines_naming(&code, name));
        let lines: BTreeSet<_> = lines.collect(); // each line once
        out.extend(lines.into_iter().map(|line| at(path, src, line)));
    }
    out
}

/// The lines on which stripped `code` names `name`: a whole word (`App`), a
/// path's head (`http::`), or a module (`crate::rooms`, grouped or not).
fn lines_naming(code: &str, name: &str) -> Vec<usize> {
    if let Some(module) = name.strip_prefix("crate::") {
        let paths = crate_paths(code).into_iter().filter(|(_, m)| m == module);
        return paths.map(|(line, _)| line).collect();
    }
    let (word, head) = name.strip_suffix("::").map_or((name, false), |w| (w, true));
    let toks = tokens(code);
    let path_follows = |k: usize| toks.get(k + 1).is_some_and(|t| t.1 == "::");
    let named = |k: &usize| toks[*k].1 == word && (!head || path_follows(*k));
    (0..toks.len()).filter(named).map(|k| toks[k].0).collect()
}

/// The top-level modules stripped `code` names as `crate::<top>`, with their
/// lines: `crate::a::b` gives `a`, and `crate::{a::{B, C}, d}` gives `a`, `d`.
fn crate_paths(code: &str) -> BTreeSet<(usize, String)> {
    let toks = tokens(code);
    let tok = |k: usize| toks.get(k).map_or("", |t| t.1);
    let mut out = BTreeSet::new();
    for k in 0..toks.len() {
        // `$crate` is a macro's caller's crate; `pub(crate)` is not a path.
        if tok(k) != "crate" || (k > 0 && tok(k - 1) == "$") || tok(k + 1) != "::" {
            continue;
        }
        if tok(k + 2) != "{" {
            out.insert((toks[k + 2].0, tok(k + 2).to_string()));
            continue;
        }
        // A group: each member starts after the `{` or a `,` at depth 1.
        let (mut depth, mut starts) = (1, true);
        for &(line, t) in &toks[k + 3..] {
            match t {
                "{" => depth += 1,
                "}" if depth == 1 => break,
                "}" => depth -= 1,
                "," => starts = depth == 1,
                _ if depth == 1 && starts => {
                    starts = false;
                    if t != "self" && t.starts_with(|c: char| c.is_alphabetic() || c == '_') {
                        out.insert((line, t.to_string()));
                    }
                }
                _ => starts = false,
            }
        }
    }
    out
}

/// Identifiers, `::` and single punctuation characters, with their lines.
fn tokens(code: &str) -> Vec<(usize, &str)> {
    let mut toks = Vec::new();
    for (n, mut rest) in code.lines().enumerate() {
        while let Some(ch) = rest.chars().next() {
            let len = match ch {
                _ if is_ident(ch) => rest.find(|c| !is_ident(c)).unwrap_or(rest.len()),
                ':' if rest.starts_with("::") => 2,
                _ => ch.len_utf8(),
            };
            if !ch.is_whitespace() {
                toks.push((n + 1, &rest[..len]));
            }
            rest = &rest[len..];
        }
    }
    toks
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// `src` with comments, string and char literals blanked to spaces, newlines
/// kept: what is left is code, and its line numbers are the file's.
fn strip(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = c.clone();
    let mut i = 0;
    while i < c.len() {
        let end = literal_end(&c, i);
        for ch in out[i..end].iter_mut().filter(|ch| **ch != '\n') {
            *ch = ' ';
        }
        i = end.max(i + 1);
    }
    out.into_iter().collect()
}

/// If a comment or literal starts at `c[i]`, the index just past it, else `i`.
fn literal_end(c: &[char], i: usize) -> usize {
    let at = |j: usize| c.get(j).copied().unwrap_or('\0');
    match at(i) {
        '/' if at(i + 1) == '/' => (i..c.len()).find(|&j| c[j] == '\n').unwrap_or(c.len()),
        '/' if at(i + 1) == '*' => {
            let (mut j, mut depth) = (i + 2, 1); // block comments nest
            while j < c.len() && depth > 0 {
                match (c[j], at(j + 1)) {
                    ('/', '*') => (depth, j) = (depth + 1, j + 2),
                    ('*', '/') => (depth, j) = (depth - 1, j + 2),
                    _ => j += 1,
                }
            }
            j
        }
        '"' => quoted_end(c, i + 1, '"'),
        '\'' if at(i + 1) == '\\' => quoted_end(c, i + 1, '\''),
        '\'' if at(i + 2) == '\'' => i + 3, // 'x'; a lifetime 'a has no closing quote
        'b' | 'c' | 'r' if i == 0 || !is_ident(c[i - 1]) => {
            // b"", b'', c"", or raw: r#""#, br#""#, cr#""#. `body` is past the prefix.
            let body = i + 1 + usize::from(at(i) != 'r' && at(i + 1) == 'r');
            if at(body - 1) != 'r' {
                let end = if matches!(at(body), '"' | '\'') {
                    literal_end(c, body)
                } else {
                    body
                };
                return if end > body { end } else { i };
            }
            let hashes = c[body..].iter().take_while(|&&ch| ch == '#').count();
            if at(body + hashes) != '"' {
                return i; // an identifier: `return`, `r#type`
            }
            let closes = |k: &usize| c[*k] == '"' && (1..=hashes).all(|h| at(k + h) == '#');
            let close = (body + hashes + 1..c.len()).find(closes);
            close.map_or(c.len(), |k| k + 1 + hashes)
        }
        _ => i,
    }
}

/// Past the `close` that ends a literal whose body starts at `c[j]`.
fn quoted_end(c: &[char], mut j: usize, close: char) -> usize {
    while j < c.len() {
        match c[j] {
            '\\' => j += 2,
            ch if ch == close => return j + 1,
            _ => j += 1,
        }
    }
    c.len()
}

/// `rooms/host.rs` is in `rooms`, `app.rs` in `app`.
fn top(path: &str) -> &str {
    let first = path.split('/').next().unwrap_or(path);
    first.strip_suffix(".rs").unwrap_or(first)
}

fn layer(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|&(_, l)| l)
}

/// A violation: `src/<path>:<line>: <the line>`, long lines cut short.
fn at(path: &str, src: &str, line: usize) -> String {
    let text = src.lines().nth(line - 1).unwrap_or("").trim();
    let cut = text.char_indices().nth(100).map_or(text.len(), |(i, _)| i);
    let more = if cut < text.len() { "..." } else { "" };
    format!("src/{path}:{line}: {}{more}", &text[..cut])
}

/// Every `.rs` file under `src/`, sorted by path.
fn read_src() -> Vec<File> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let (mut files, mut dirs) = (Vec::new(), vec![root.clone()]);
    while let Some(dir) = dirs.pop() {
        for path in fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()) {
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(&root).unwrap().iter();
                let rel: Vec<_> = rel.map(|c| c.to_string_lossy()).collect();
                files.push((rel.join("/"), fs::read_to_string(&path).unwrap()));
            }
        }
    }
    files.sort();
    assert!(files.len() > 10, "too few files under {}", root.display());
    files
}

/// The files the layering applies to: all but the crate roots, which only
/// declare the modules and wire them up.
fn layered() -> Vec<File> {
    let is_root = |path: &str| path == "main.rs" || path == "lib.rs";
    read_src()
        .into_iter()
        .filter(|(path, _)| !is_root(path))
        .collect()
}
