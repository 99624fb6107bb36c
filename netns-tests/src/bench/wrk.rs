//! HTTP load with `wrk` (BENCH.md: `wrk -t1 -c32 -d5s --latency`, with and
//! without `Connection: close`), run inside the client namespace.

use std::time::Duration;

use anyhow::{Context, Result, bail};

use netns_tests::topo::Host;

/// What one wrk run measured.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct WrkResult {
    pub requests: u64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Socket errors: connect + read + write + timeout.
    pub errors: u64,
    /// Responses with a status other than 2xx or 3xx.
    pub non_2xx: u64,
}

/// Runs `wrk -t1 -c<conns> -d<secs>s --latency [-H 'Connection: close'] url`
/// in `client`. wrk stops on its own after the duration.
pub fn run(
    client: &Host,
    url: &str,
    close: bool,
    conns: u32,
    duration: Duration,
) -> Result<WrkResult> {
    let c = format!("-c{conns}");
    let d = format!("-d{}s", duration.as_secs().max(1));
    let mut argv = vec!["wrk", "-t1", &c, &d, "--latency"];
    if close {
        argv.extend(["-H", "Connection: close"]);
    }
    argv.push(url);
    let out = client.run(&argv)?;
    parse(&out).with_context(|| format!("parsing the output of {argv:?}:\n{out}"))
}

/// A wrk duration (`812.00us`, `1.20ms`, `2.00s`, `1.00m`) in milliseconds.
fn parse_time_ms(s: &str) -> Option<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    let factor = match unit {
        "us" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        "m" => 60e3,
        "h" => 3600e3,
        _ => return None,
    };
    Some(v * factor)
}

/// Parses wrk 4's report.
pub fn parse(out: &str) -> Result<WrkResult> {
    let mut r = WrkResult::default();
    let (mut p50, mut p99, mut rps) = (None, None, None);
    for line in out.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", t] => p50 = parse_time_ms(t),
            ["99%", t] => p99 = parse_time_ms(t),
            ["Requests/sec:", v] => rps = v.parse::<f64>().ok(),
            [n, "requests", "in", ..] => r.requests = n.parse().context("request count")?,
            ["Non-2xx", "or", "3xx", "responses:", n] => {
                r.non_2xx = n.parse().context("non-2xx count")?
            }
            ["Socket", "errors:", rest @ ..] => {
                // connect 0, read 0, write 0, timeout 0
                for pair in rest.chunks(2) {
                    if let [_, n] = pair {
                        r.errors += n
                            .trim_end_matches(',')
                            .parse::<u64>()
                            .context("socket error count")?;
                    }
                }
            }
            _ => {}
        }
    }
    let (Some(p50), Some(p99), Some(rps)) = (p50, p99, rps) else {
        bail!("no latency distribution or request rate in the report (was --latency given?)");
    };
    r.p50_ms = p50;
    r.p99_ms = p99;
    r.rps = rps;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "Running 5s test @ http://198.18.0.100/f100
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.02ms  345.00us   8.00ms   80.00%
    Req/Sec    31.20k     1.20k   33.00k    70.00%
  Latency Distribution
     50%  812.00us
     75%    1.10ms
     90%    1.30ms
     99%    2.10s
  155012 requests in 5.00s, 50.00MB read
  Socket errors: connect 1, read 2, write 0, timeout 12
  Non-2xx or 3xx responses: 5
Requests/sec:  31002.40
Transfer/sec:     10.00MB
";

    #[test]
    fn a_full_report_gives_rate_percentiles_and_errors() {
        let r = parse(REPORT).expect("parses");
        assert_eq!(r.requests, 155_012);
        assert!((r.rps - 31_002.40).abs() < 1e-6);
        assert!((r.p50_ms - 0.812).abs() < 1e-9);
        assert!((r.p99_ms - 2100.0).abs() < 1e-9);
        assert_eq!(r.errors, 15);
        assert_eq!(r.non_2xx, 5);
    }

    #[test]
    fn a_report_without_latency_distribution_is_an_error() {
        let short = "  10 requests in 1.00s, 1.00KB read\nRequests/sec:     10.00\n";
        assert!(parse(short).is_err());
    }

    #[test]
    fn wrk_time_units_convert_to_milliseconds() {
        assert_eq!(parse_time_ms("250.00us"), Some(0.25));
        assert_eq!(parse_time_ms("1.50ms"), Some(1.5));
        assert_eq!(parse_time_ms("2.00s"), Some(2000.0));
        assert_eq!(parse_time_ms("1.00m"), Some(60_000.0));
        assert_eq!(parse_time_ms("3.00x"), None);
    }
}
