//! llama-server arguments as the supervisor keeps them: the binary plus a map from canonical flag
//! name to value, so `-m x` and `--model x` are one argument.
//!
//! Which spellings name the same option is learned from the binary's own `--help`, never from a
//! table of ours: llama.cpp renames and adds options between builds.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

use crate::store::{ArgValue, SavedArgs};

/// How long `<binary> --help` may take.
const HELP_TIMEOUT: Duration = Duration::from_secs(10);

impl SavedArgs {
    /// The argv after the binary, in canonical-name order.
    pub fn argv(&self) -> Vec<&str> {
        let mut argv = Vec::with_capacity(self.args.len() * 2);
        for (flag, value) in &self.args {
            argv.push(flag.as_str());
            if let ArgValue::Value(text) = value {
                argv.push(text.as_str());
            }
        }
        argv
    }

    /// Sets `--port` (its canonical name is the one llama-server's help lists first).
    pub fn set_port(&mut self, port: u16) {
        self.args
            .insert(PORT.to_owned(), ArgValue::Value(port.to_string()));
    }

    /// The `--port` llama-server listens on (and the supervisor checks `/health` on).
    pub fn port(&self) -> Option<u16> {
        match self.args.get(PORT) {
            Some(ArgValue::Value(text)) => parse_port(text),
            _ => None,
        }
    }
}

const PORT: &str = "--port";

fn parse_port(text: &str) -> Option<u16> {
    text.parse::<u16>().ok().filter(|&port| port != 0)
}

/// A change to [`SavedArgs`]: canonical flags set (`Some`) or removed (`None`), maybe a new binary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Change {
    pub binary: Option<String>,
    pub flags: BTreeMap<String, Option<ArgValue>>,
}

impl Change {
    /// `later` on top of `self`: its keys win.
    pub fn merge(&mut self, later: Change) {
        if later.binary.is_some() {
            self.binary = later.binary;
        }
        self.flags.extend(later.flags);
    }

    /// The change that turns `from` into `to` (both canonical).
    pub fn between(from: &SavedArgs, to: &SavedArgs) -> Change {
        let binary = (from.binary != to.binary).then(|| to.binary.clone());
        let removed = from
            .args
            .keys()
            .filter(|flag| !to.args.contains_key(*flag))
            .map(|flag| (flag.clone(), None));
        let set = to
            .args
            .iter()
            .filter(|(flag, value)| from.args.get(*flag) != Some(value))
            .map(|(flag, value)| (flag.clone(), Some(value.clone())));
        Change {
            binary,
            flags: removed.chain(set).collect(),
        }
    }

    /// `args` with this change applied.
    pub fn apply_to(&self, args: &SavedArgs) -> SavedArgs {
        let mut out = args.clone();
        if let Some(binary) = &self.binary {
            out.binary.clone_from(binary);
        }
        for (flag, value) in &self.flags {
            match value {
                Some(value) => out.args.insert(flag.clone(), value.clone()),
                None => out.args.remove(flag),
            };
        }
        out
    }

    /// The `--port` this change sets, if any.
    pub fn port(&self) -> Option<u16> {
        match self.flags.get(PORT) {
            Some(Some(ArgValue::Value(text))) => parse_port(text),
            _ => None,
        }
    }

    /// Rejects a change that would leave the instance without a usable `--port`.
    pub fn check(&self) -> Result<(), ArgsError> {
        match self.flags.get(PORT) {
            None => Ok(()),
            Some(None) => Err(ArgsError::PortRemoved),
            Some(Some(ArgValue::Value(text))) if parse_port(text).is_some() => Ok(()),
            Some(Some(_)) => Err(ArgsError::BadPort),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    #[error(
        "`{0}` is not a flag, nor the value of one: llama-server takes no positional arguments"
    )]
    Positional(String),
    #[error("{0} needs a value")]
    MissingValue(String),
    #[error("--port cannot be removed: the supervisor checks /health on it")]
    PortRemoved,
    #[error("--port must be a port number from 1 to 65535")]
    BadPort,
    #[error("the value of {0} holds a control character (NUL, ESC, ...), which no argument may")]
    ControlCharacter(String),
}

/// A control character other than tab, line feed and carriage return, which chat templates and
/// grammars given inline do hold.
fn has_control(text: &str) -> bool {
    text.chars()
        .any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
}

#[derive(Debug, thiserror::Error)]
pub enum HelpError {
    #[error("running `{binary} --help`: {source}")]
    Run {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{binary} --help` did not finish within {HELP_TIMEOUT:?}")]
    Timeout { binary: String },
}

/// Every spelling a binary's `--help` lists, mapped to its option.
#[derive(Debug, Default)]
pub struct Aliases {
    spellings: HashMap<String, Spec>,
}

#[derive(Clone, Debug)]
struct Spec {
    /// The first long form (else the first spelling) of this side of the option.
    canonical: String,
    /// The other side of a `--x, --no-x` pair: setting one removes the other.
    opposite: Option<String>,
    takes_value: bool,
}

impl Aliases {
    /// Runs `<binary> --help` once and parses its option lines.
    pub async fn learn(binary: &str) -> Result<Aliases, HelpError> {
        let output = tokio::process::Command::new(binary)
            .arg("--help")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(HELP_TIMEOUT, output)
            .await
            .map_err(|_| HelpError::Timeout {
                binary: binary.to_owned(),
            })?
            .map_err(|source| HelpError::Run {
                binary: binary.to_owned(),
                source,
            })?;
        // Some builds print usage to stderr; take both.
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.push('\n');
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        Ok(Aliases::parse_help(&text))
    }

    /// Option lines as llama.cpp's `common_arg::to_string` prints them: spellings separated by
    /// `, `, then one space and a value hint if the option takes a value, then at least three
    /// spaces (or a line break) and the help text. Negated spellings (`--no-x`) are the other
    /// side of the same option.
    pub fn parse_help(text: &str) -> Aliases {
        let mut spellings = HashMap::new();
        for line in text.lines().filter(|line| line.starts_with('-')) {
            let Some((names, takes_value)) = option_line(line) else {
                continue;
            };
            let (negative, positive): (Vec<&str>, Vec<&str>) =
                names.iter().partition(|n| n.starts_with("--no-"));
            let canonical = |side: &[&str]| {
                side.iter()
                    .find(|n| n.starts_with("--"))
                    .or(side.first())
                    .map(|n| (*n).to_owned())
            };
            let (pos, neg) = (canonical(&positive), canonical(&negative));
            for (side, this, other, value) in [
                (&positive, &pos, &neg, takes_value),
                (&negative, &neg, &pos, false),
            ] {
                let Some(this) = this else { continue };
                for name in side {
                    spellings.entry((*name).to_owned()).or_insert_with(|| Spec {
                        canonical: this.clone(),
                        opposite: other.clone(),
                        takes_value: value,
                    });
                }
            }
        }
        Aliases { spellings }
    }

    /// The canonical name of `flag`; an unknown flag is its own (llama-server will judge it).
    fn spec(&self, flag: &str) -> Option<&Spec> {
        self.spellings.get(flag)
    }

    /// Whether `flag` takes a value, when its help says.
    pub fn takes_value(&self, flag: &str) -> Option<bool> {
        self.spec(flag).map(|spec| spec.takes_value)
    }

    /// The other side of `flag`'s `--x, --no-x` pair, if any.
    pub fn opposite(&self, flag: &str) -> Option<&str> {
        self.spec(flag).and_then(|spec| spec.opposite.as_deref())
    }

    /// Flags in the order given, with canonical names; later ones win.
    pub fn change<I>(&self, binary: Option<String>, flags: I) -> Change
    where
        I: IntoIterator<Item = (String, Option<ArgValue>)>,
    {
        let mut change = Change {
            binary,
            flags: BTreeMap::new(),
        };
        for (flag, value) in flags {
            match self.spec(&flag) {
                Some(spec) => {
                    if let (Some(opposite), Some(_)) = (&spec.opposite, &value) {
                        change.flags.insert(opposite.clone(), None);
                    }
                    change.flags.insert(spec.canonical.clone(), value);
                }
                None => {
                    change.flags.insert(flag, value);
                }
            }
        }
        change
    }

    /// A command line (`-m x --mlock -c 2048`) as a change. A known option takes a value when its
    /// help shows one; an unknown flag takes the next word unless that is a flag too.
    pub fn parse_argv(&self, argv: &[String]) -> Result<Change, ArgsError> {
        let mut flags = Vec::new();
        let mut words = argv.iter().peekable();
        while let Some(word) = words.next() {
            if !is_flag_name(word) || is_number(word) {
                return Err(ArgsError::Positional(word.clone()));
            }
            let takes_value = match self.spec(word) {
                Some(spec) => spec.takes_value,
                None => words
                    .peek()
                    .is_some_and(|next| !is_flag_name(next) || is_number(next)),
            };
            let value = if takes_value {
                let text = words
                    .next()
                    .ok_or_else(|| ArgsError::MissingValue(word.clone()))?;
                ArgValue::Value(text.clone())
            } else {
                ArgValue::Flag
            };
            flags.push((word.clone(), Some(value)));
        }
        Ok(self.change(None, flags))
    }
}

/// The spellings on an option line and whether a value hint follows them.
fn option_line(line: &str) -> Option<(Vec<&str>, bool)> {
    let mut names = Vec::new();
    let mut rest = line;
    loop {
        let end = rest.find([',', ' ']).unwrap_or(rest.len());
        let name = &rest[..end];
        if !is_flag_name(name) {
            return None;
        }
        names.push(name);
        rest = &rest[end..];
        match rest.strip_prefix(',') {
            Some(after) => rest = after.trim_start(),
            None => break,
        }
    }
    // One space then a word is a value hint; the help text is at least three spaces away.
    let takes_value = rest
        .strip_prefix(' ')
        .is_some_and(|after| after.starts_with(|c: char| !c.is_whitespace()));
    Some((names, takes_value))
}

/// `-m`, `--model`, `--no-mmap`, `-ctk`; not `-----` section rules.
fn is_flag_name(name: &str) -> bool {
    let body = name
        .strip_prefix("--")
        .or_else(|| name.strip_prefix('-'))
        .unwrap_or("");
    body.starts_with(|c: char| c.is_ascii_alphanumeric())
        && body
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// `-1`, `0.5`: a value, although it starts with a dash.
fn is_number(word: &str) -> bool {
    word.parse::<f64>().is_ok()
}

/// One value of the API's `args` object: `null` removes, `true` is a bare flag, strings and
/// numbers are values. An integer is passed on as written, whatever its size (a JSON number
/// read as `f64` would change above 2^53); other numbers as their `f64` reads them (`1e3` is
/// `1000`).
#[derive(Debug, PartialEq)]
pub struct Input(pub Option<ArgValue>);

const INPUT_EXPECTED: &str = "a string, a number, true (bare flag) or null (remove)";

impl<'de> Deserialize<'de> for Input {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Box::<serde_json::value::RawValue>::deserialize(deserializer)?;
        let text = raw.get();
        let value = match text.as_bytes().first() {
            Some(b'"') => Some(ArgValue::Value(
                serde_json::from_str::<String>(text).map_err(de::Error::custom)?,
            )),
            Some(b'n') => None,
            Some(b't') => Some(ArgValue::Flag),
            Some(b'f') => {
                return Err(de::Error::custom(
                    "`false` is not a value: use null to remove a flag, or the string \"false\"",
                ));
            }
            Some(b'-' | b'0'..=b'9') if is_integer(text) => Some(ArgValue::Value(text.to_owned())),
            Some(b'-' | b'0'..=b'9') => {
                let number: f64 = serde_json::from_str(text).map_err(de::Error::custom)?;
                Some(ArgValue::Value(number.to_string()))
            }
            Some(b'[') => {
                return Err(de::Error::invalid_type(
                    de::Unexpected::Seq,
                    &INPUT_EXPECTED,
                ));
            }
            _ => {
                return Err(de::Error::invalid_type(
                    de::Unexpected::Map,
                    &INPUT_EXPECTED,
                ));
            }
        };
        Ok(Input(value))
    }
}

/// `-12`, `18446744073709551617`: a JSON integer literal.
fn is_integer(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// The API's `args` object, in the order written (later keys win), flags not yet canonical.
#[derive(Debug, Default, PartialEq)]
pub struct InputArgs {
    pub binary: Option<String>,
    pub flags: Vec<(String, Option<ArgValue>)>,
}

impl InputArgs {
    /// Rejects a control character in a value or the binary (no argv can carry a NUL; the
    /// others are no part of a real value): checked first, before any binary is looked at.
    pub fn check(&self) -> Result<(), ArgsError> {
        let values = self.flags.iter().filter_map(|(flag, value)| match value {
            Some(ArgValue::Value(text)) => Some((flag.as_str(), text.as_str())),
            _ => None,
        });
        let binary = self.binary.as_deref().map(|b| ("binary", b));
        match values.chain(binary).find(|(_, text)| has_control(text)) {
            Some((flag, _)) => Err(ArgsError::ControlCharacter(flag.to_owned())),
            None => Ok(()),
        }
    }
}

impl<'de> Deserialize<'de> for InputArgs {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(InputArgsVisitor)
    }
}

struct InputArgsVisitor;

impl<'de> Visitor<'de> for InputArgsVisitor {
    type Value = InputArgs;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of flags (\"--model\": \"x\") and maybe \"binary\"")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<InputArgs, A::Error> {
        let mut args = InputArgs::default();
        while let Some(key) = map.next_key::<String>()? {
            if key == "binary" {
                args.binary = Some(map.next_value::<String>()?);
            } else if is_flag_name(&key) {
                let Input(value) = map.next_value()?;
                args.flags.push((key, value));
            } else {
                return Err(de::Error::custom(format_args!(
                    "`{key}` is not a flag name: keys are flags like \"--model\" or \"-c\" \
                     (no `=value`), or \"binary\""
                )));
            }
        }
        Ok(args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as this llama.cpp build prints them.
    const HELP: &str = "\
----- common params -----

-h,    --help, --usage                  print usage and exit
-c,    --ctx-size N                     size of the prompt context (default: 4096, 0 = loaded
                                        from model)
                                        (env: LLAMA_ARG_CTX_SIZE)
-fa,   --flash-attn [on|off|auto]       set Flash Attention use ('on', 'off', or 'auto', default:
--mlock                                 force system to keep model in RAM
--mmap, --no-mmap                       whether to memory-map model (default: enabled)
-m,    --model FNAME                    model path to load
--lora-scaled FNAME SCALE               path to LoRA adapter with user defined scaling
-np,   --parallel N                     number of server slots (default: -1, -1 = auto)
--port PORT                             port to listen (default: 8080)
-a,    --alias STRING                   set alias for model name
--spec-replace-very-long-option TARGET DRAFT
                                        translate the string in TARGET into DRAFT
";

    fn empty() -> SavedArgs {
        SavedArgs {
            binary: "llama-server".to_owned(),
            args: BTreeMap::new(),
        }
    }

    fn text(s: &str) -> Option<ArgValue> {
        Some(ArgValue::Value(s.to_owned()))
    }

    fn words(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn help_lines_give_canonical_names_and_arity() {
        let aliases = Aliases::parse_help(HELP);
        let canonical = |flag: &str| aliases.spec(flag).map(|s| s.canonical.as_str());
        assert_eq!(canonical("-m"), Some("--model"));
        assert_eq!(canonical("--model"), Some("--model"));
        assert_eq!(canonical("-np"), Some("--parallel"));
        assert_eq!(canonical("-h"), Some("--help"));
        assert_eq!(canonical("--usage"), Some("--help"));
        assert_eq!(canonical("--no-mmap"), Some("--no-mmap"));
        assert_eq!(canonical("--mmap"), Some("--mmap"));
        assert_eq!(
            canonical("--spec-replace-very-long-option"),
            Some("--spec-replace-very-long-option")
        );
        assert_eq!(canonical("-----"), None);
        let takes = |flag: &str| aliases.spec(flag).map(|s| s.takes_value);
        assert_eq!(takes("-c"), Some(true));
        assert_eq!(takes("-fa"), Some(true));
        assert_eq!(takes("--mlock"), Some(false));
        assert_eq!(takes("--mmap"), Some(false));
        assert_eq!(takes("--lora-scaled"), Some(true));
        assert_eq!(takes("--spec-replace-very-long-option"), Some(true));
    }

    #[test]
    fn aliases_are_one_argument_and_later_wins() {
        let aliases = Aliases::parse_help(HELP);
        let mut change = aliases.change(None, [("-m".to_owned(), text("a.gguf"))]);
        change.merge(aliases.change(None, [("--model".to_owned(), text("b.gguf"))]));
        let args = change.apply_to(&empty());
        assert_eq!(args.argv(), ["--model", "b.gguf"]);

        let one = aliases.change(
            None,
            [
                ("--model".to_owned(), text("b.gguf")),
                ("-m".to_owned(), text("c.gguf")),
            ],
        );
        assert_eq!(one.flags.get("--model"), Some(&text("c.gguf")));
        assert_eq!(one.flags.len(), 1);
    }

    #[test]
    fn negation_removes_the_other_side() {
        let aliases = Aliases::parse_help(HELP);
        let base = aliases
            .parse_argv(&words("--mmap --port 8080"))
            .map(|c| c.apply_to(&empty()));
        let base = base.unwrap_or_else(|e| panic!("{e}"));
        let args = aliases
            .change(None, [("--no-mmap".to_owned(), Some(ArgValue::Flag))])
            .apply_to(&base);
        assert_eq!(args.argv(), ["--no-mmap", "--port", "8080"]);
        let removed = aliases
            .change(None, [("--no-mmap".to_owned(), None)])
            .apply_to(&args);
        assert_eq!(removed.argv(), ["--port", "8080"]);
    }

    #[test]
    fn argv_parsing() {
        let aliases = Aliases::parse_help(HELP);
        let change = aliases
            .parse_argv(&words(
                "-m x.gguf --mlock -c 2048 --unknown v --other -np 2 --seed -1",
            ))
            .unwrap_or_else(|e| panic!("{e}"));
        let args = change.apply_to(&empty());
        assert_eq!(
            args.argv(),
            [
                "--ctx-size",
                "2048",
                "--mlock",
                "--model",
                "x.gguf",
                "--other",
                "--parallel",
                "2",
                "--seed",
                "-1",
                "--unknown",
                "v"
            ]
        );
        assert_eq!(
            aliases.parse_argv(&words("-m")),
            Err(ArgsError::MissingValue("-m".to_owned()))
        );
        for positional in ["x.gguf", "-1", "-"] {
            assert_eq!(
                aliases.parse_argv(&words(positional)),
                Err(ArgsError::Positional(positional.to_owned()))
            );
        }
    }

    #[test]
    fn between_is_the_change_from_one_to_the_other() {
        let aliases = Aliases::parse_help(HELP);
        let parse = |line: &str| {
            aliases
                .parse_argv(&words(line))
                .map(|c| c.apply_to(&empty()))
                .unwrap_or_else(|e| panic!("{e}"))
        };
        let before = parse("-m a.gguf --port 8080 -c 2048 --mlock");
        let after = parse("-m b.gguf --port 8080 -c 2048 -np 2");
        let change = Change::between(&before, &after);
        assert_eq!(
            change.flags,
            BTreeMap::from([
                ("--mlock".to_owned(), None),
                ("--model".to_owned(), text("b.gguf")),
                ("--parallel".to_owned(), text("2")),
            ])
        );
        assert_eq!(change.binary, None);
        assert_eq!(change.apply_to(&before), after);
        // Applied to something else (API changes since), it touches only what the edit did.
        let mut changed_by_api = before.clone();
        changed_by_api
            .args
            .insert("--ctx-size".to_owned(), ArgValue::Value("8192".to_owned()));
        let merged = change.apply_to(&changed_by_api);
        assert_eq!(
            merged.argv(),
            [
                "--ctx-size",
                "8192",
                "--model",
                "b.gguf",
                "--parallel",
                "2",
                "--port",
                "8080"
            ]
        );
        assert_eq!(Change::between(&after, &after), Change::default());
    }

    #[test]
    fn port_checks() {
        let set = |value| Change {
            binary: None,
            flags: [(PORT.to_owned(), value)].into(),
        };
        assert_eq!(set(text("8081")).check(), Ok(()));
        assert_eq!(set(None).check(), Err(ArgsError::PortRemoved));
        assert_eq!(set(text("0")).check(), Err(ArgsError::BadPort));
        assert_eq!(set(text("http")).check(), Err(ArgsError::BadPort));
        assert_eq!(set(Some(ArgValue::Flag)).check(), Err(ArgsError::BadPort));
        let args = set(text("8081")).apply_to(&empty());
        assert_eq!(args.port(), Some(8081));
    }

    #[test]
    fn api_input_keeps_order_and_types() {
        let input: InputArgs = serde_json::from_str(
            r#"{"-m": "/models/new.gguf", "--port": "8081", "binary": "/opt/llama-server",
                "-c": 8192, "--flash-attn": true, "--mlock": null, "--temp": 0.5}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(input.binary.as_deref(), Some("/opt/llama-server"));
        assert_eq!(
            input.flags,
            [
                ("-m".to_owned(), text("/models/new.gguf")),
                ("--port".to_owned(), text("8081")),
                ("-c".to_owned(), text("8192")),
                ("--flash-attn".to_owned(), Some(ArgValue::Flag)),
                ("--mlock".to_owned(), None),
                ("--temp".to_owned(), text("0.5")),
            ]
        );
        let error = |json: &str| match serde_json::from_str::<InputArgs>(json) {
            Ok(input) => panic!("{json} parsed as {input:?}"),
            Err(e) => e.to_string(),
        };
        assert!(error(r#"{"--mlock": false}"#).contains("`false` is not a value"));
        assert!(error(r#"{"model": "x"}"#).contains("`model` is not a flag name"));
        assert!(error(r#"{"--port=8081": true}"#).contains("is not a flag name"));
        assert!(error(r#"{"-c": [1]}"#).contains("a string, a number, true"));
        assert!(error(r#"{"binary": null}"#).contains("invalid type: null"));
        assert!(error(r#"["-m"]"#).contains("an object of flags"));
    }
}
