//! Run-time log levels: the process's tracing subscriber filters through a reload layer, and
//! Envoy's `/logging` changes it.
//!
//! skiff's loggers are tracing targets (module paths such as `skiff::xds`); Envoy's are named
//! components. `POST /logging?level=debug` sets every target's level (it replaces the per-target
//! ones, as Envoy's sets every logger), `?paths=skiff::xds:debug,skiff::http:trace` and Envoy's
//! `?<target>=<level>` change one target each. `GET /logging` (and `POST` without arguments,
//! as Envoy) lists the default level and each target's. Levels are Envoy's (`trace`, `debug`,
//! `info`, `warning`/`warn`, `error`, `critical`, `off`); `critical` is tracing's `error`.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// Why a `/logging` change was refused.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// Not one of Envoy's level names.
    #[error("unknown logger level {0:?}: use trace, debug, info, warning, error, critical or off")]
    UnknownLevel(String),
    /// A `paths` entry without `:level`.
    #[error("bad paths entry {0:?}: expected <target>:<level>")]
    BadPath(String),
    /// No reloadable subscriber in this process (a library user installed its own).
    #[error("log levels cannot change at run time: skiff's subscriber is not installed")]
    NotInstalled,
    /// The reload layer refused the new filter.
    #[error("cannot apply the new filter: {0}")]
    Reload(String),
}

/// Levels as tracing's filter directives spell them, with Envoy's name for display.
fn parse_level(s: &str) -> Result<&'static str, LoggingError> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "trace" => "trace",
        "debug" => "debug",
        "info" => "info",
        "warning" | "warn" => "warn",
        "error" | "critical" => "error",
        "off" => "off",
        _ => return Err(LoggingError::UnknownLevel(s.to_string())),
    })
}

/// The levels in force: a default and per-target overrides, rendered into one filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Levels {
    /// Level of every target without its own.
    pub default: String,
    /// Per-target levels, by target.
    pub targets: BTreeMap<String, String>,
}

impl Levels {
    /// Parse an `EnvFilter`-style directive list (`info,skiff::xds=debug`); directives other
    /// than `target=level` and a bare level are kept out (they cannot be listed).
    pub fn parse(directives: &str) -> Levels {
        let mut l = Levels {
            default: "info".to_string(),
            targets: BTreeMap::new(),
        };
        for d in directives
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
        {
            match d.split_once('=') {
                Some((t, lv)) => {
                    if let Ok(lv) = parse_level(lv) {
                        l.targets.insert(t.to_string(), lv.to_string());
                    }
                }
                None => {
                    if let Ok(lv) = parse_level(d) {
                        l.default = lv.to_string();
                    }
                }
            }
        }
        l
    }

    /// The directive list for `EnvFilter`.
    pub fn directives(&self) -> String {
        std::iter::once(self.default.clone())
            .chain(self.targets.iter().map(|(t, l)| format!("{t}={l}")))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Apply `/logging` arguments: `level` sets all, `paths` and `<target>=<level>` one each.
    /// Nothing changes if any argument is bad.
    pub fn apply(&mut self, args: &BTreeMap<String, String>) -> Result<(), LoggingError> {
        let mut next = self.clone();
        // `level` first whatever the query's order, so targets named beside it stay.
        if let Some(v) = args.get("level") {
            next.default = parse_level(v)?.to_string();
            next.targets.clear();
        }
        for (k, v) in args {
            match k.as_str() {
                "level" => {}
                "paths" => {
                    for p in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                        let (t, lv) = p
                            .rsplit_once(':')
                            .ok_or_else(|| LoggingError::BadPath(p.to_string()))?;
                        next.targets
                            .insert(t.to_string(), parse_level(lv)?.to_string());
                    }
                }
                target => {
                    next.targets
                        .insert(target.to_string(), parse_level(v)?.to_string());
                }
            }
        }
        *self = next;
        Ok(())
    }

    /// Envoy's listing: `active loggers:` then `  <target>: <level>` lines, the default first
    /// as `default`.
    pub fn render(&self) -> String {
        let shown = |l: &str| if l == "warn" { "warning" } else { l }.to_string();
        let mut out = String::from("active loggers:\n");
        out.push_str(&format!("  default: {}\n", shown(&self.default)));
        for (t, l) in &self.targets {
            out.push_str(&format!("  {t}: {}\n", shown(l)));
        }
        out
    }
}

/// The installed subscriber's reload handle and the levels it was last given.
struct Control {
    handle: reload::Handle<EnvFilter, Registry>,
    levels: Mutex<Levels>,
}

static CONTROL: OnceLock<Control> = OnceLock::new();

/// Install skiff's tracing subscriber (stderr, filter from `RUST_LOG` or `info`), with a
/// filter `/logging` can change. Does nothing if a subscriber is already installed.
pub fn init() {
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_string());
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info"));
    let (layer, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if tracing_subscriber::registry()
        .with(layer)
        .with(fmt)
        .try_init()
        .is_ok()
    {
        let _ = CONTROL.set(Control {
            handle,
            levels: Mutex::new(Levels::parse(&directives)),
        });
    }
}

/// The levels in force, if skiff's subscriber is installed.
pub fn levels() -> Option<Levels> {
    let c = CONTROL.get()?;
    Some(c.levels.lock().unwrap_or_else(|e| e.into_inner()).clone())
}

/// Apply `/logging` arguments to the running subscriber; returns the levels now in force.
pub fn set(args: &BTreeMap<String, String>) -> Result<Levels, LoggingError> {
    let c = CONTROL.get().ok_or(LoggingError::NotInstalled)?;
    let mut levels = c.levels.lock().unwrap_or_else(|e| e.into_inner());
    let mut next = levels.clone();
    next.apply(args)?;
    let filter =
        EnvFilter::try_new(next.directives()).map_err(|e| LoggingError::Reload(e.to_string()))?;
    c.handle
        .reload(filter)
        .map_err(|e| LoggingError::Reload(e.to_string()))?;
    *levels = next;
    Ok(levels.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn levels_follow_envoy_s_arguments() {
        let mut l = Levels::parse("info,skiff::xds=debug,h2=warn");
        assert_eq!(l.directives(), "info,h2=warn,skiff::xds=debug");
        l.apply(&args(&[("paths", "skiff::http:trace,skiff::lb:critical")]))
            .unwrap();
        assert_eq!(l.targets["skiff::http"], "trace");
        assert_eq!(l.targets["skiff::lb"], "error");
        l.apply(&args(&[("skiff::admin", "warning")])).unwrap();
        assert_eq!(l.targets["skiff::admin"], "warn");
        l.apply(&args(&[("level", "debug")])).unwrap();
        assert_eq!(l.directives(), "debug");
        assert!(
            l.render()
                .starts_with("active loggers:\n  default: debug\n")
        );
    }

    #[test]
    fn a_bad_argument_changes_nothing() {
        let mut l = Levels::parse("info");
        let before = l.clone();
        assert!(matches!(
            l.apply(&args(&[("paths", "skiff::xds:debug,skiff::http:loud")])),
            Err(LoggingError::UnknownLevel(_))
        ));
        assert!(matches!(
            l.apply(&args(&[("paths", "xds")])),
            Err(LoggingError::BadPath(_))
        ));
        assert_eq!(l, before);
    }
}
