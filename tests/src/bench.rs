//! What the benchmark binaries share: their common options, a seeded random source, percentiles, writing each result
//! set (JSON, its markdown table, PNG plots) atomically, and one bar-chart shape for every plot.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex, OnceLock, PoisonError},
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;

use crate::{
    netns::{ChildGuard, NetNs},
    topology::{HttpConn, Topology, steer_bin},
};
use plotters::{
    coord::ranged1d::{AsRangedCoord, ValueFormatter},
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
    style::{FontStyle, register_font},
};

/// The options every benchmark binary takes (`#[command(flatten)]`).
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// A short run: a smoke of the harness, not a measurement.
    #[arg(long)]
    pub quick: bool,
    /// Where to write the results as JSON (the markdown tables go beside it, `.md`).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// SplitMix64: a small deterministic generator, so a simulation with the same seed replays
/// exactly (no `rand` dependency for one function).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Exponentially distributed with mean `mean`.
    pub fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// The `q` quantile (0..=1) of `values` by the nearest-rank method; NaN when empty.
pub fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_unstable_by(f64::total_cmp);
    let rank = (q * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

/// p50 and p99 of `values`.
pub fn p50_p99(values: &mut [f64]) -> (f64, f64) {
    (percentile(values, 0.50), percentile(values, 0.99))
}

/// Requests the open-loop client lets be outstanding; one more due is counted as late.
pub const MAX_OUTSTANDING: usize = 512;

/// What one fixed-rate run measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fixed {
    pub rate: f64,
    pub completed: u64,
    /// Failed requests (connect, I/O, non-200, or unanswered at the end).
    pub errors: u64,
    /// Requests not started because `MAX_OUTSTANDING` were outstanding.
    pub late: u64,
    /// SYNs the client retransmitted meanwhile (new-connection runs).
    pub syn_retrans: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Latency at a fixed offered load: `GET path` started every `1/rate` s for `secs` (spread
/// over `addrs` in turn) from source address `from`, each on a pooled keep-alive connection or,
/// with `fresh`, a new one.
/// Open loop: a slow answer delays no later request, so it cannot hide the queueing it causes.
/// Latency runs from the request's start (connect included when fresh) to its whole answer.
pub async fn fixed_rate(
    from: Ipv4Addr,
    addrs: &[SocketAddrV4],
    path: &str,
    rate: f64,
    secs: u32,
    fresh: bool,
) -> Fixed {
    type Pool = Arc<Vec<Mutex<Vec<HttpConn>>>>;
    let pools: Pool = Arc::new(addrs.iter().map(|_| Mutex::new(Vec::new())).collect());
    let total = (rate * f64::from(secs)) as u64;
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut fixed = Fixed {
        rate,
        ..Fixed::default()
    };
    let mut latencies = Vec::new();
    let mut collect = |result: Result<Result<f64, ()>, tokio::task::JoinError>| match result {
        Ok(Ok(ms)) => latencies.push(ms),
        _ => fixed.errors += 1,
    };
    for i in 0..total {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
        while let Some(done) = tasks.try_join_next() {
            collect(done);
        }
        if tasks.len() >= MAX_OUTSTANDING {
            fixed.late += 1;
            continue;
        }
        let which = (i % addrs.len() as u64) as usize;
        let addr = SocketAddr::V4(addrs[which]);
        let pools = Arc::clone(&pools);
        let path = path.to_owned();
        tasks.spawn(async move {
            let began = Instant::now();
            let pooled = if fresh {
                None
            } else {
                pools[which]
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .pop()
            };
            let mut conn = match pooled {
                Some(conn) => conn,
                None => HttpConn::connect_from(Some(from), addr)
                    .await
                    .map_err(drop)?,
            };
            match conn.try_request("GET", &path, None).await {
                Ok(r) if r.status == 200 => {
                    let ms = began.elapsed().as_secs_f64() * 1e3;
                    if !fresh {
                        pools[which]
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(conn);
                    }
                    Ok(ms)
                }
                _ => Err(()),
            }
        });
    }
    // Bounded: what has not answered 5 s after the last start counts as failed.
    let drain = async {
        while let Some(done) = tasks.join_next().await {
            collect(done);
        }
    };
    if tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .is_err()
    {
        fixed.errors += tasks.len() as u64;
        tasks.abort_all();
    }
    fixed.completed = latencies.len() as u64;
    (fixed.p50_ms, fixed.p99_ms) = p50_p99(&mut latencies);
    fixed
}

/// Starts `program` in `ns` with its stdout and stderr in `log`.
pub fn spawn_logged(ns: &NetNs, program: &Path, args: &[&str], log: &Path) -> ChildGuard {
    ns.spawn(logged(program, args, log))
}

/// [`spawn_logged`] in this process's own namespace (benchmarks on loopback).
pub fn spawn_logged_here(program: &Path, args: &[&str], log: &Path) -> ChildGuard {
    ChildGuard::spawn(logged(program, args, log))
        .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()))
}

fn logged(program: &Path, args: &[&str], log: &Path) -> Command {
    let out =
        std::fs::File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup log"))
        .stderr(out);
    cmd
}

/// A `/proc/<pid>/status` field in kB (`VmRSS`, `VmHWM`); 0 when missing.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                let rest = l.strip_prefix(field)?.strip_prefix(':')?;
                rest.split_whitespace().next()?.parse().ok()
            })
        })
        .unwrap_or(0)
}

/// Ports [`free_port`] hands out: below the kernel's ephemeral range (32768-60999 by default,
/// which `connect` picks its source ports from) and below the agent's default SNAT ports.
const TEST_PORTS: std::ops::RangeInclusive<u16> = 10000..=16383;

/// A loopback TCP port free at the time of the call, never handed out before by this process,
/// and outside the ephemeral range: a port `bind(0)` gives is one an outgoing connection (an
/// agent's to its backends, a client's) may take before the test's server binds it (CI saw an
/// admin API fail so with "Address already in use").
pub fn free_port() -> u16 {
    use std::hash::BuildHasher;
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(PoisonError::into_inner);
    let random = std::collections::hash_map::RandomState::new();
    let span = u64::from(TEST_PORTS.end() - TEST_PORTS.start()) + 1;
    // Bounded: the range holds 6,384 ports; a test process takes a few dozen.
    for attempt in 0..10_000u64 {
        let port = TEST_PORTS.start() + (random.hash_one(attempt) % span) as u16;
        if given.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    panic!("no free loopback port in {TEST_PORTS:?} after 10,000 tries")
}

/// CPU time (user + system, seconds) used so far by process `pid` and its live descendants:
/// `utime + stime` from `/proc/PID/stat`, in clock ticks of 10 ms. Gone processes count zero.
pub fn cpu_seconds(pid: u32) -> f64 {
    let mut stats = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(p) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
                // Fields after the command name, which is in parentheses and may hold spaces.
                if let Some((_, rest)) = stat.rsplit_once(") ") {
                    let fields: Vec<u64> =
                        rest.split(' ').map(|f| f.parse().unwrap_or(0)).collect();
                    // rest[0] is field 3 (state): ppid is field 4, utime 14, stime 15.
                    if fields.len() > 13 {
                        stats.push((p, fields[1] as u32, fields[11] + fields[12]));
                    }
                }
            }
        }
    }
    let mut tree = vec![pid];
    let mut ticks = 0;
    while let Some(p) = tree.pop() {
        for &(child, parent, t) in &stats {
            if child == p {
                ticks += t;
            }
            if parent == p {
                tree.push(child);
            }
        }
    }
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 / hz as f64
}

/// A cgroup that caps the CPU of the processes put in it (e.g. to make one backend of a fleet
/// several times slower), removed on drop. cgroup v2 (`cpu.max`) where the cpu controller is
/// there, else v1 (`cpu.cfs_quota_us` under `/sys/fs/cgroup/cpu`).
#[derive(Debug)]
pub struct CpuCap {
    dir: PathBuf,
    /// Where a process goes back to when the cgroup is removed.
    parent: PathBuf,
    v2: bool,
}

impl CpuCap {
    /// A new cgroup `name-<pid>` allowed `share` of one CPU (e.g. 0.2), over a 20 ms period so a
    /// capped process stalls for short spans, not for most of a 100 ms one.
    pub fn new(name: &str, share: f64) -> std::io::Result<CpuCap> {
        const PERIOD_US: u64 = 20_000;
        let quota = ((share * PERIOD_US as f64) as u64).max(1_000);
        let root = Path::new("/sys/fs/cgroup");
        let v2 = std::fs::read_to_string(root.join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "cpu"));
        let parent = if v2 {
            root.to_owned()
        } else {
            root.join("cpu")
        };
        let dir = parent.join(format!("{name}-{}", std::process::id()));
        if v2 {
            // The children of the root get the cpu controller only when it is enabled there.
            std::fs::write(root.join("cgroup.subtree_control"), "+cpu")?;
        }
        std::fs::create_dir_all(&dir)?;
        let cap = CpuCap { dir, parent, v2 };
        if v2 {
            std::fs::write(cap.dir.join("cpu.max"), format!("{quota} {PERIOD_US}"))?;
        } else {
            std::fs::write(cap.dir.join("cpu.cfs_period_us"), PERIOD_US.to_string())?;
            std::fs::write(cap.dir.join("cpu.cfs_quota_us"), quota.to_string())?;
        }
        Ok(cap)
    }

    /// Moves process `pid` (all its threads) into the cgroup.
    pub fn add(&self, pid: u32) -> std::io::Result<()> {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
    }

    /// Which interface the cap was set through, for reports.
    pub fn describe(&self) -> String {
        let file = if self.v2 {
            "cpu.max"
        } else {
            "cpu.cfs_quota_us"
        };
        format!("{} ({file})", self.dir.display())
    }
}

impl Drop for CpuCap {
    fn drop(&mut self) {
        // A cgroup with processes in it cannot be removed: move what is left back out.
        if let Ok(procs) = std::fs::read_to_string(self.dir.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = std::fs::write(self.parent.join("cgroup.procs"), pid);
            }
        }
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            eprintln!("removing cgroup {}: {e}", self.dir.display());
        }
    }
}

/// Stops a process with SIGTERM (an agent detaches, nginx's master stops its workers), killing
/// it after 5 s.
pub fn stop(mut child: ChildGuard, what: &str) {
    if child
        .signal_and_wait(Signal::SIGTERM, Duration::from_secs(5))
        .is_none()
    {
        eprintln!("{what} still running 5 s after SIGTERM; killing it");
    }
}

/// Writes `config` to `<topology dir>/<name>.toml` and starts `steer run` with it in the LB
/// namespace, its output in `<name>.log` (for configs [`Topology::start_agent`] does not write,
/// e.g. another dataplane or policy on the same hosts). Returns the agent and its log's path.
pub fn spawn_agent(topo: &Topology, name: &str, config: &str) -> (ChildGuard, PathBuf) {
    let path = topo.dir.join(format!("{name}.toml"));
    write_atomic(&path, config.as_bytes())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    let log = topo.dir.join(format!("{name}.log"));
    let config_arg = path.display().to_string();
    let agent = spawn_logged(
        &topo.lb,
        &steer_bin(),
        &["run", "--config", &config_arg, "--log-level", "warn"],
        &log,
    );
    (agent, log)
}

/// `text` with `from` replaced once by `to`; panics when `from` is not there (e.g. the generated
/// agent config changed shape).
pub fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "no {from:?} in:\n{text}");
    text.replacen(from, to, 1)
}

/// `x / base`, NaN when the base is not positive.
pub fn ratio(x: f64, base: f64) -> f64 {
    if base > 0.0 { x / base } else { f64::NAN }
}

/// Writes `bytes` to `path` through a temporary file and a rename, creating the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Writes a benchmark's results: `out` (JSON) and, beside it, `out` with extension `md` (the
/// markdown tables the benchmark printed), so `cargo xtask bench` can gather a report.
pub fn write_results(out: &Path, json: &serde_json::Value, markdown: &str) -> std::io::Result<()> {
    write_atomic(out, format!("{json:#}\n").as_bytes())?;
    write_atomic(&out.with_extension("md"), markdown.as_bytes())
}

/// [`write_results`] for the benchmark binary `bin`: success, or the error on stderr and a
/// failing exit status.
pub fn save_results(
    bin: &str,
    out: &Path,
    json: &serde_json::Value,
    markdown: &str,
) -> std::process::ExitCode {
    match write_results(out, json, markdown) {
        Ok(()) => {
            eprintln!("{bin}: wrote {}", out.display());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{bin}: writing {}: {e}", out.display());
            std::process::ExitCode::FAILURE
        }
    }
}

/// The TTF the plots' text is drawn with (Debian `fonts-dejavu-core`, installed by
/// `cargo xtask deps`): plotters' `ab_glyph` backend reads no system font configuration.
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("font {FONT}: {0} (install fonts-dejavu-core: cargo xtask deps)")]
    Font(String),
    #[error("drawing {path}: {message}")]
    Draw { path: PathBuf, message: String },
}

fn register_sans() -> Result<(), PlotError> {
    // Registered once per process; every later call sees the first call's outcome.
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let bytes = std::fs::read(FONT).map_err(|e| e.to_string())?;
            // Registered fonts must live for the whole process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| "not a TrueType font".to_owned())
        })
        .clone()
        .map_err(PlotError::Font)
}

/// One coloured series of a bar chart: a value per group (NaN: no bar).
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub values: Vec<f64>,
}

/// The y axis of a [`bar_chart`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// From zero.
    Linear,
    /// Logarithmic, for figures spanning orders of magnitude (latencies with outliers).
    Log,
}

/// A grouped bar chart in a PNG: for each group (x axis), one bar per series, coloured by series
/// with a legend, each bar labelled with its value. A horizontal line at `reference` (e.g. 1.0
/// for ratios to a baseline) when given.
pub fn bar_chart(
    path: &Path,
    title: &str,
    y_label: &str,
    groups: &[String],
    series: &[Series],
    reference: Option<f64>,
    scale: Scale,
) -> Result<(), PlotError> {
    register_sans()?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| PlotError::Draw {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    }
    let values = || {
        series
            .iter()
            .flat_map(|s| s.values.iter().copied())
            .chain(reference)
            .filter(|v| v.is_finite() && *v > 0.0)
    };
    let top = values().fold(1e-9, f64::max);
    let drawn = match scale {
        Scale::Linear => draw_bars(
            path,
            title,
            y_label,
            groups,
            series,
            reference,
            0.0..top * 1.3,
            0.0,
        ),
        Scale::Log => {
            let bottom = values().fold(top, f64::min) / 2.0;
            let y = (bottom..top * 3.0).log_scale();
            draw_bars(path, title, y_label, groups, series, reference, y, bottom)
        }
    };
    drawn.map_err(|e| PlotError::Draw {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

const PALETTE: [RGBColor; 7] = [
    RGBColor(0x4e, 0x79, 0xa7),
    RGBColor(0xf2, 0x8e, 0x2b),
    RGBColor(0x59, 0xa1, 0x4f),
    RGBColor(0xe1, 0x57, 0x59),
    RGBColor(0x76, 0xb7, 0xb2),
    RGBColor(0xb0, 0x7a, 0xa1),
    RGBColor(0x9c, 0x75, 0x5f),
];

/// Draws the chart on `y` (linear or log), bars rising from `baseline`.
#[expect(clippy::too_many_arguments, reason = "one private call site per scale")]
fn draw_bars<Y>(
    path: &Path,
    title: &str,
    y_label: &str,
    groups: &[String],
    series: &[Series],
    reference: Option<f64>,
    y: Y,
    baseline: f64,
) -> Result<(), Box<dyn std::error::Error>>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let per_group = series.len() + 1; // one empty bar between groups
    let bars = groups.len() * per_group;
    let root = BitMapBackend::new(path, (1000, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((0..bars).into_segmented(), y)?;
    let names = groups.to_vec();
    let label_at = series.len() / 2;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) if i % per_group == label_at => {
                names.get(i / per_group).cloned().unwrap_or_default()
            }
            _ => String::new(),
        })
        .y_desc(y_label)
        .label_style(("sans-serif", 14))
        .draw()?;
    for (k, s) in series.iter().enumerate() {
        let color = PALETTE[k % PALETTE.len()];
        let data: Vec<(usize, f64)> = s
            .values
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(g, &v)| (g * per_group + k, v))
            .collect();
        chart
            .draw_series(
                Histogram::vertical(&chart)
                    .baseline(baseline)
                    .style(color.filled())
                    .margin(2)
                    .data(data.iter().copied()),
            )?
            .label(s.name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        chart.draw_series(data.iter().map(|&(i, v)| {
            Text::new(
                format_value(v),
                (SegmentValue::CenterOf(i), v),
                ("sans-serif", 11)
                    .into_font()
                    .color(&BLACK)
                    .pos(Pos::new(HPos::Center, VPos::Bottom)),
            )
        }))?;
    }
    if let Some(r) = reference {
        chart.draw_series(LineSeries::new(
            [(SegmentValue::Exact(0), r), (SegmentValue::Exact(bars), r)],
            BLACK.stroke_width(1),
        ))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    Ok(())
}

/// A short label for a bar: 3 significant digits.
fn format_value(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(p50_p99(&mut v), (50.0, 99.0));
        let mut one = vec![7.0];
        assert_eq!(p50_p99(&mut one), (7.0, 7.0));
        assert!(percentile(&mut [], 0.5).is_nan());
    }

    #[test]
    fn the_generator_replays_from_its_seed() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let xs: Vec<u64> = (0..5).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..5).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        assert!((0..1000).all(|_| (0.0..1.0).contains(&a.unit())));
    }
}
