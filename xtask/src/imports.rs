//! `cargo xtask check-imports`: fails when the agent's modules (`lb-userspace/src`) import each
//! other in a cycle (or one imports `config`, which only the crate root may), so the module
//! graph stays one-way and a module can be read (and moved) without the rest of the crate behind
//! it.
//!
//! What counts, read from the source text (no compiler needed):
//! - A node is a file: `a.rs` or `a/mod.rs` stands for module `a`, `a/b.rs` for `a::b`. The
//!   crate root (`lib.rs`, `main.rs`) is not a node: it declares and wires every module.
//! - An edge A -> B when A names a path starting `crate::`, `super::` or `self::` (in a `use`
//!   tree or anywhere in the code) whose longest prefix that is a module is B's. Bare paths are
//!   not read, so a parent re-exporting its own child (`pub use child::Item`) is no edge, and
//!   items of the crate root lead nowhere.
//! - Test code may import freely: an item under `#[cfg(test)]` (a `mod tests` block, a test-only
//!   function or field) is skipped, and so is a whole file declared `#[cfg(test)] mod name;`.
//!   Comments (doc links included) and string literals are skipped too.
//!
//! A cycle is a strongly connected component of more than one file; each is printed with the
//! edges inside it, one example path per edge.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};

/// A module path below the crate root (`["dataplane", "xdp"]`); empty for the root.
type Module = Vec<String>;

/// Modules only the crate root may import: `config` parses files into the shared vocabulary
/// (`spec`), and a module that read the config itself would be a second composition root.
const ROOT_ONLY: [&str; 1] = ["config.rs"];

/// Reads every `.rs` file under `src` and fails naming the files of each import cycle, and any
/// module that imports one of [`ROOT_ONLY`].
pub fn check(src: &Path) -> anyhow::Result<()> {
    let graph = Graph::new(&read_tree(src)?);
    let reaching = graph.importers_of_root_only();
    if !reaching.is_empty() {
        for (file, target, example) in &reaching {
            println!("  {} -> {} ({example})", file.display(), target.display());
        }
        bail!(
            "{}: only lib.rs and main.rs may import {}",
            src.display(),
            ROOT_ONLY.join(", ")
        );
    }
    let cycles = graph.cycles();
    if cycles.is_empty() {
        println!(
            "{}: no import cycle among {} modules",
            src.display(),
            graph.edges.len()
        );
        return Ok(());
    }
    for cycle in &cycles {
        println!("import cycle among {} files:", cycle.len());
        for file in cycle {
            let inside: Vec<String> = graph.edges[file]
                .iter()
                .filter(|(to, _)| cycle.contains(to))
                .map(|(to, example)| format!("{} ({example})", to.display()))
                .collect();
            println!("  {} -> {}", file.display(), inside.join(", "));
        }
    }
    let named: Vec<String> = cycles
        .iter()
        .map(|c| {
            let files: Vec<String> = c.iter().map(|f| f.display().to_string()).collect();
            files.join(", ")
        })
        .collect();
    bail!(
        "{}: {} import cycle(s): {}",
        src.display(),
        cycles.len(),
        named.join("; ")
    )
}

/// The `.rs` files under `src`, keyed by their path relative to it.
fn read_tree(src: &Path) -> anyhow::Result<BTreeMap<PathBuf, String>> {
    let mut files = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?;
        for entry in entries {
            let path = entry
                .with_context(|| format!("reading {}", dir.display()))?
                .path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let rel = path.strip_prefix(src).unwrap_or(&path).to_path_buf();
                files.insert(rel, text);
            }
        }
    }
    Ok(files)
}

/// The module a file (relative to `src`) defines.
fn module_of(file: &Path) -> Module {
    let mut segs: Module = file
        .with_extension("")
        .iter()
        .map(|s| s.to_string_lossy().into_owned())
        .collect();
    if segs.last().is_some_and(|s| s == "mod") {
        segs.pop();
    }
    if segs.len() == 1 && (segs[0] == "lib" || segs[0] == "main") {
        segs.clear();
    }
    segs
}

/// Files and the files each one imports (with one path that shows it).
struct Graph {
    edges: BTreeMap<PathBuf, BTreeMap<PathBuf, String>>,
}

impl Graph {
    fn new(files: &BTreeMap<PathBuf, String>) -> Graph {
        let scans: BTreeMap<&PathBuf, Scan> = files
            .iter()
            .map(|(file, text)| (file, scan(&lex(text), &module_of(file))))
            .collect();
        let test_only: Vec<&Module> = scans.values().flat_map(|s| &s.test_modules).collect();
        let modules: BTreeMap<Module, &PathBuf> = files
            .keys()
            .map(|f| (module_of(f), f))
            .filter(|(m, _)| !m.is_empty() && !test_only.iter().any(|t| m.starts_with(t)))
            .collect();
        let mut edges = BTreeMap::new();
        for &file in modules.values() {
            let mut out: BTreeMap<PathBuf, String> = BTreeMap::new();
            for path in &scans[file].paths {
                let target = (1..=path.len())
                    .rev()
                    .find_map(|n| modules.get(&path[..n]))
                    .filter(|&&target| target != file);
                if let Some(&target) = target {
                    out.entry(target.clone())
                        .or_insert_with(|| format!("crate::{}", path.join("::")));
                }
            }
            edges.insert(file.clone(), out);
        }
        Graph { edges }
    }

    /// Edges into a [`ROOT_ONLY`] file: the importer, the file and the path that shows it.
    fn importers_of_root_only(&self) -> Vec<(&PathBuf, &PathBuf, &String)> {
        self.edges
            .iter()
            .flat_map(|(file, out)| out.iter().map(move |(to, example)| (file, to, example)))
            .filter(|(_, to, _)| ROOT_ONLY.iter().any(|r| Path::new(r) == to.as_path()))
            .collect()
    }

    /// Strongly connected components of more than one file (Tarjan), each sorted.
    fn cycles(&self) -> Vec<Vec<PathBuf>> {
        #[derive(Default)]
        struct Tarjan<'a> {
            next: usize,
            index: BTreeMap<&'a PathBuf, (usize, usize)>,
            stack: Vec<&'a PathBuf>,
            on_stack: BTreeSet<&'a PathBuf>,
            found: Vec<Vec<PathBuf>>,
        }
        fn visit<'a>(g: &'a Graph, t: &mut Tarjan<'a>, v: &'a PathBuf) {
            t.index.insert(v, (t.next, t.next));
            t.next += 1;
            t.stack.push(v);
            t.on_stack.insert(v);
            for w in g.edges[v].keys() {
                let low = if !t.index.contains_key(w) {
                    visit(g, t, w);
                    t.index[w].1
                } else if t.on_stack.contains(w) {
                    t.index[w].0
                } else {
                    continue;
                };
                if let Some(v_index) = t.index.get_mut(v) {
                    v_index.1 = v_index.1.min(low);
                }
            }
            let (index, low) = t.index[v];
            if index == low {
                let mut component = Vec::new();
                while let Some(w) = t.stack.pop() {
                    t.on_stack.remove(w);
                    component.push(w.clone());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    t.found.push(component);
                }
            }
        }
        let mut t = Tarjan::default();
        for v in self.edges.keys() {
            if !t.index.contains_key(v) {
                visit(self, &mut t, v);
            }
        }
        t.found.sort();
        t.found
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok<'a> {
    Ident(&'a str),
    /// `::`
    Sep,
    Punct(u8),
}

/// Rust tokens that matter for paths: identifiers, `::` and punctuation. Comments, string, char
/// and number literals and lifetimes are dropped.
fn lex(text: &str) -> Vec<Tok<'_>> {
    let b = text.as_bytes();
    let at = |i: usize| b.get(i).copied().unwrap_or(0);
    let is_ident = |c: u8| c == b'_' || c.is_ascii_alphanumeric();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() || !c.is_ascii() {
            i += 1;
        } else if c == b'/' && at(i + 1) == b'/' {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && at(i + 1) == b'*' {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && at(i + 1) == b'*' {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && at(i + 1) == b'/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == b'"' {
            i = skip_string(b, i + 1);
        } else if c == b'\'' {
            // A char literal ('x', '\n', 'é') or a lifetime ('a), which is skipped as a quote.
            let len = utf8_len(at(i + 1));
            if at(i + 1) == b'\\' {
                i += 2;
                while i < b.len() && b[i] != b'\'' {
                    i += 1;
                }
                i += 1;
            } else if at(i + 1 + len) == b'\'' {
                i += 2 + len;
            } else {
                i += 1;
            }
        } else if let Some(end) = raw_string(b, i) {
            i = end;
        } else if (c == b'b' || c == b'c') && at(i + 1) == b'"' {
            i = skip_string(b, i + 2);
        } else if c == b'b' && at(i + 1) == b'\'' {
            i += 1;
        } else if is_ident(c) {
            let start = i;
            while i < b.len() && is_ident(b[i]) {
                i += 1;
            }
            if !c.is_ascii_digit() {
                toks.push(Tok::Ident(&text[start..i]));
            }
        } else if c == b':' && at(i + 1) == b':' {
            toks.push(Tok::Sep);
            i += 2;
        } else {
            toks.push(Tok::Punct(c));
            i += 1;
        }
    }
    toks
}

fn utf8_len(lead: u8) -> usize {
    match lead {
        0xf0.. => 4,
        0xe0.. => 3,
        0xc0.. => 2,
        _ => 1,
    }
}

/// The index after a string whose opening quote ends before `i`.
fn skip_string(b: &[u8], mut i: usize) -> usize {
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    i
}

/// The end of a raw string (`r"..."`, `r#"..."#`, `br`/`cr` forms) starting at `i`, if one does.
fn raw_string(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i;
    if matches!(b.get(j), Some(b'b' | b'c')) {
        j += 1;
    }
    if b.get(j) != Some(&b'r') {
        return None;
    }
    j += 1;
    let hashes = b[j..].iter().take_while(|&&c| c == b'#').count();
    j += hashes;
    if b.get(j) != Some(&b'"') {
        return None;
    }
    let close: Vec<u8> = std::iter::once(b'"')
        .chain(std::iter::repeat_n(b'#', hashes))
        .collect();
    let body = j + 1;
    let end = b[body..]
        .windows(close.len())
        .position(|w| w == close.as_slice())
        .map_or(b.len(), |p| body + p + close.len());
    Some(end)
}

/// What one file names: absolute module paths (items included), and modules it declares test-only.
#[derive(Debug, Default)]
struct Scan {
    paths: Vec<Module>,
    test_modules: Vec<Module>,
}

const ITEM_KEYWORDS: &[&str] = &[
    "pub",
    "fn",
    "impl",
    "struct",
    "enum",
    "union",
    "mod",
    "trait",
    "use",
    "const",
    "static",
    "type",
    "unsafe",
    "async",
    "extern",
    "macro_rules",
];

fn scan(toks: &[Tok<'_>], file_module: &Module) -> Scan {
    let mut out = Scan::default();
    let tok = |i: usize| toks.get(i).copied();
    let cfg_test = [
        Tok::Punct(b'['),
        Tok::Ident("cfg"),
        Tok::Punct(b'('),
        Tok::Ident("test"),
        Tok::Punct(b')'),
        Tok::Punct(b']'),
    ];
    // `#![cfg(test)]` among the file's leading attributes: the whole file is test code.
    let mut i = 0;
    while tok(i) == Some(Tok::Punct(b'#')) && tok(i + 1) == Some(Tok::Punct(b'!')) {
        if toks.get(i + 2..i + 8) == Some(&cfg_test[..]) {
            out.test_modules.push(file_module.clone());
            return out;
        }
        i = skip_group(toks, i + 2);
    }
    // Inline modules open at a brace depth: (depth inside, name).
    let mut inline: Vec<(usize, &str)> = Vec::new();
    let mut depth = 0;
    let here = |inline: &[(usize, &str)]| -> Module {
        let mut m = file_module.clone();
        m.extend(inline.iter().map(|(_, n)| (*n).to_owned()));
        m
    };
    while i < toks.len() {
        match toks[i] {
            Tok::Punct(b'#') if toks.get(i + 1..i + 7) == Some(&cfg_test[..]) => {
                let mut j = skip_attributes(toks, i);
                let item = j;
                if tok(j) == Some(Tok::Ident("pub")) {
                    j += 1;
                    if tok(j) == Some(Tok::Punct(b'(')) {
                        j = skip_group(toks, j);
                    }
                }
                if let (Some(Tok::Ident("mod")), Some(Tok::Ident(name)), Some(Tok::Punct(b';'))) =
                    (tok(j), tok(j + 1), tok(j + 2))
                {
                    let mut m = here(&inline);
                    m.push(name.to_owned());
                    out.test_modules.push(m);
                }
                i = end_of_item(toks, item);
            }
            Tok::Ident("use") if tok(i + 1) != Some(Tok::Punct(b'<')) => {
                let mut j = i + 1;
                let mut trees = Vec::new();
                use_tree(toks, &mut j, Vec::new(), &mut trees);
                let module = here(&inline);
                out.paths
                    .extend(trees.iter().filter_map(|p| absolute(p, &module)));
                while j < toks.len() && toks[j] != Tok::Punct(b';') {
                    j += 1;
                }
                i = j + 1;
            }
            Tok::Ident("mod") => {
                if let (Some(Tok::Ident(name)), Some(Tok::Punct(b'{'))) = (tok(i + 1), tok(i + 2)) {
                    depth += 1;
                    inline.push((depth, name));
                    i += 3;
                } else {
                    i += 1;
                }
            }
            Tok::Punct(b'{') => {
                depth += 1;
                i += 1;
            }
            Tok::Punct(b'}') => {
                if inline.last().is_some_and(|(d, _)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
                i += 1;
            }
            Tok::Ident(first @ ("crate" | "super" | "self"))
                if tok(i + 1) == Some(Tok::Sep) && (i == 0 || toks[i - 1] != Tok::Sep) =>
            {
                let mut path = vec![first];
                let mut j = i + 1;
                while let (Some(Tok::Sep), Some(Tok::Ident(seg))) = (tok(j), tok(j + 1)) {
                    path.push(seg);
                    j += 2;
                }
                out.paths.extend(absolute(&path, &here(&inline)));
                i = j;
            }
            _ => i += 1,
        }
    }
    out
}

/// The index after the attributes (`#[...]`) starting at `i`.
fn skip_attributes(toks: &[Tok<'_>], mut i: usize) -> usize {
    while toks.get(i) == Some(&Tok::Punct(b'#')) && toks.get(i + 1) == Some(&Tok::Punct(b'[')) {
        i = skip_group(toks, i + 1);
    }
    i
}

/// The index after the bracketed group opening at `i`.
fn skip_group(toks: &[Tok<'_>], mut i: usize) -> usize {
    let mut depth = 0usize;
    while i < toks.len() {
        match toks[i] {
            Tok::Punct(b'(' | b'[' | b'{') => depth += 1,
            Tok::Punct(b')' | b']' | b'}') => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    i
}

/// The index after the item (or field, match arm, statement) starting at `i`: its `;`, its
/// brace-delimited body, or for what is not an item a `,`; never past the enclosing group.
fn end_of_item(toks: &[Tok<'_>], mut i: usize) -> usize {
    let is_item = matches!(toks.get(i), Some(Tok::Ident(k)) if ITEM_KEYWORDS.contains(k));
    let mut depth = 0usize;
    while i < toks.len() {
        match toks[i] {
            Tok::Punct(b'(' | b'[' | b'{') => depth += 1,
            Tok::Punct(b')' | b']' | b'}') => {
                if depth == 0 {
                    return i;
                }
                depth -= 1;
                if depth == 0 && toks[i] == Tok::Punct(b'}') {
                    return i + 1;
                }
            }
            Tok::Punct(b';') if depth == 0 => return i + 1,
            Tok::Punct(b',') if depth == 0 && !is_item => return i + 1,
            _ => {}
        }
        i += 1;
    }
    i
}

/// Expands the use tree at `i` (after `use`) into full paths, e.g. `crate::a::{b, c::{self, D}}`
/// into `crate::a::b`, `crate::a::c::self`, `crate::a::c::D`.
fn use_tree<'a>(
    toks: &[Tok<'a>],
    i: &mut usize,
    mut path: Vec<&'a str>,
    out: &mut Vec<Vec<&'a str>>,
) {
    if toks.get(*i) == Some(&Tok::Sep) {
        *i += 1;
    }
    loop {
        match toks.get(*i) {
            Some(Tok::Ident(seg)) => {
                path.push(seg);
                *i += 1;
                if toks.get(*i) == Some(&Tok::Sep) {
                    *i += 1;
                    continue;
                }
                if toks.get(*i) == Some(&Tok::Ident("as")) {
                    *i += 2;
                }
                out.push(path);
                return;
            }
            Some(Tok::Punct(b'{')) => {
                *i += 1;
                loop {
                    match toks.get(*i) {
                        None => return,
                        Some(Tok::Punct(b'}')) => {
                            *i += 1;
                            return;
                        }
                        Some(Tok::Punct(b',')) => *i += 1,
                        Some(_) => {
                            let before = *i;
                            use_tree(toks, i, path.clone(), out);
                            if *i == before {
                                return;
                            }
                        }
                    }
                }
            }
            Some(Tok::Punct(b'*')) => {
                *i += 1;
                out.push(path);
                return;
            }
            _ => return,
        }
    }
}

/// `path` as a module path from the crate root, when it starts `crate`, `super` or `self`.
fn absolute(path: &[&str], here: &Module) -> Option<Module> {
    let (mut abs, rest) = match *path.first()? {
        "crate" => (Vec::new(), &path[1..]),
        "self" | "super" => (here.clone(), path),
        _ => return None,
    };
    for seg in rest {
        match *seg {
            "self" => {}
            "super" => {
                abs.pop()?;
            }
            seg => abs.push(seg.to_owned()),
        }
    }
    Some(abs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> BTreeMap<PathBuf, String> {
        files
            .iter()
            .map(|(path, text)| (PathBuf::from(path), (*text).to_owned()))
            .collect()
    }

    fn cycles(files: &[(&str, &str)]) -> Vec<Vec<String>> {
        Graph::new(&tree(files))
            .cycles()
            .iter()
            .map(|c| c.iter().map(|f| f.display().to_string()).collect())
            .collect()
    }

    fn imports(files: &[(&str, &str)], from: &str) -> Vec<String> {
        Graph::new(&tree(files)).edges[Path::new(from)]
            .keys()
            .map(|f| f.display().to_string())
            .collect()
    }

    #[test]
    fn only_the_root_may_import_the_config() {
        let files = [
            (
                "lib.rs",
                "mod config; mod spec; mod table; use crate::config::Config;",
            ),
            ("config.rs", "use crate::spec::Spec;\npub struct Config;"),
            ("spec.rs", "pub struct Spec;"),
            ("table.rs", "use crate::spec::Spec;"),
        ];
        assert!(
            Graph::new(&tree(&files))
                .importers_of_root_only()
                .is_empty()
        );
        let mut reaching = files;
        reaching[3] = ("table.rs", "fn f() -> crate::config::Config { todo!() }");
        let graph = Graph::new(&tree(&reaching));
        let found: Vec<String> = graph
            .importers_of_root_only()
            .iter()
            .map(|(from, to, _)| format!("{} -> {}", from.display(), to.display()))
            .collect();
        assert_eq!(found, ["table.rs -> config.rs"]);
    }

    #[test]
    fn a_cycle_is_named_by_its_files() {
        let files = [
            ("lib.rs", "pub mod a; pub mod b; pub mod c; pub mod d;"),
            ("a.rs", "use crate::b::B;\npub struct A;"),
            ("b.rs", "pub struct B;\nfn f() { crate::c::g() }"),
            ("c.rs", "use crate::{a::A, d};\npub fn g() {}"),
            ("d.rs", "pub fn h() {}"),
        ];
        assert_eq!(cycles(&files), [["a.rs", "b.rs", "c.rs"]]);
    }

    #[test]
    fn a_dag_passes() {
        let files = [
            (
                "lib.rs",
                "pub mod a; pub mod net; use crate::a::A; pub struct Root;",
            ),
            (
                "a.rs",
                "use crate::net::{tcp::Tcp, Net};\nuse crate::Root;\npub struct A;",
            ),
            ("net/mod.rs", "mod tcp;\npub use tcp::Tcp;\npub struct Net;"),
            ("net/tcp.rs", "use super::Net;\npub struct Tcp;"),
        ];
        assert_eq!(cycles(&files), Vec::<Vec<String>>::new());
        assert_eq!(imports(&files, "a.rs"), ["net/mod.rs", "net/tcp.rs"]);
        assert_eq!(imports(&files, "net/tcp.rs"), ["net/mod.rs"]);
        assert_eq!(imports(&files, "net/mod.rs"), Vec::<String>::new());
    }

    #[test]
    fn super_and_self_paths_resolve_to_their_modules() {
        let files = [
            ("lib.rs", "pub mod net;"),
            (
                "net/mod.rs",
                "pub mod ip; pub mod tcp;\npub use self::tcp::Tcp;\npub trait Plane {}",
            ),
            (
                "net/tcp.rs",
                "pub struct Tcp;\nimpl super::Plane for Tcp {}",
            ),
            ("net/ip/mod.rs", "pub mod route;"),
            ("net/ip/route.rs", "use super::super::tcp::{self, Tcp};"),
        ];
        assert_eq!(cycles(&files), [["net/mod.rs", "net/tcp.rs"]]);
        assert_eq!(imports(&files, "net/ip/route.rs"), ["net/tcp.rs"]);
    }

    #[test]
    fn test_code_may_import_anything() {
        let with_tests = [
            ("lib.rs", "pub mod a; pub mod b;\n#[cfg(test)]\nmod fake;"),
            (
                "a.rs",
                "use crate::b::B;\n#[cfg(test)]\nuse crate::fake::Fake;\npub struct A;",
            ),
            (
                "b.rs",
                "pub struct B {\n    n: u8,\n    #[cfg(test)]\n    a: crate::a::A,\n}\n\
                 #[cfg(test)]\n#[expect(dead_code)]\nfn helper() -> crate::a::A { crate::a::A }\n\
                 #[cfg(test)]\nmod tests {\n    use crate::a::A;\n    mod inner { use super::super::B; }\n}\n\
                 pub fn after_tests() {}",
            ),
            ("fake.rs", "use crate::a::A;\npub struct Fake;"),
        ];
        assert_eq!(cycles(&with_tests), Vec::<Vec<String>>::new());
        // The same tree with every `#[cfg(test)]` gone is a cycle: the attributes are what
        // keep it out.
        let without: Vec<(&str, String)> = with_tests
            .iter()
            .map(|(f, t)| (*f, t.replace("#[cfg(test)]", "")))
            .collect();
        let without: Vec<(&str, &str)> = without.iter().map(|(f, t)| (*f, t.as_str())).collect();
        assert_eq!(cycles(&without), [["a.rs", "b.rs", "fake.rs"]]);
    }

    #[test]
    fn comments_and_strings_are_not_imports() {
        let files = [
            ("lib.rs", "pub mod a; pub mod b;"),
            ("a.rs", "use crate::b::B;"),
            (
                "b.rs",
                "//! Read with [`crate::a`].\n/* crate::a::A /* nested */ crate::a */\n\
                 pub struct B;\nconst S: &str = \"crate::a::A\";\nconst R: &str = r#\"crate::a\"#;\n\
                 const C: char = '\"'; fn f<'a>(x: &'a str) -> &'a str { x } // crate::a",
            ),
        ];
        assert_eq!(imports(&files, "b.rs"), Vec::<String>::new());
        assert_eq!(cycles(&files), Vec::<Vec<String>>::new());
    }

    #[test]
    fn check_reads_a_tree_from_disk_and_fails_naming_the_cycle() {
        let dir = std::env::temp_dir().join(format!("xtask-imports-{}", std::process::id()));
        let write = |file: &str, text: &str| {
            let path = dir.join(file);
            fs::create_dir_all(path.parent().expect("a file has a parent")).expect("mkdir");
            fs::write(path, text).expect("write");
        };
        write("lib.rs", "pub mod a; pub mod store;");
        write("a.rs", "use crate::store::file::File;");
        write("store/mod.rs", "pub mod file;");
        write("store/file.rs", "pub struct File;");
        let dag = check(&dir);
        write("store/file.rs", "pub struct File(crate::a::A);");
        let cycle = check(&dir);
        fs::remove_dir_all(&dir).expect("remove the tree");
        assert!(dag.is_ok(), "{dag:?}");
        let message = format!("{:#}", cycle.expect_err("a cycle fails"));
        assert!(
            message.ends_with("1 import cycle(s): a.rs, store/file.rs"),
            "{message}"
        );
    }
}
