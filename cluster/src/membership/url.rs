//! `etcd://HOST:PORT[,HOST:PORT...]/JOB`: where a job's members register.

use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

/// A job in etcd: the endpoints of the etcd cluster and the job's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterUrl {
    /// The etcd endpoints, each `HOST:PORT`.
    pub endpoints: Vec<String>,
    /// The job's name: letters, digits, `.`, `_` and `-`.
    pub job: String,
}

impl ClusterUrl {
    /// The job `job` on the etcd endpoints `endpoints` (`HOST:PORT[,HOST:PORT...]`), as
    /// `flexmodel worker --etcd ... --job ...` takes them.
    pub fn new(endpoints: &str, job: &str) -> Result<Self> {
        let bad = |reason: String| Error::BadClusterUrl {
            url: format!("etcd://{endpoints}/{job}"),
            reason,
        };
        let endpoints = endpoints
            .split(',')
            .map(|endpoint| check_endpoint(endpoint).map_err(bad))
            .collect::<Result<Vec<String>>>()?;
        if job.is_empty() {
            return Err(bad("the job's name is empty".into()));
        }
        if let Some(c) = job
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(bad(format!(
                "the job's name holds {c:?}; use letters, digits, '.', '_' and '-'"
            )));
        }
        Ok(Self {
            endpoints,
            job: job.to_string(),
        })
    }

    /// The endpoints as URLs the etcd client takes (`http://HOST:PORT`).
    pub(crate) fn endpoint_urls(&self) -> Vec<String> {
        self.endpoints
            .iter()
            .map(|e| format!("http://{e}"))
            .collect()
    }
}

/// `endpoint` if it is `HOST:PORT` with a port number.
fn check_endpoint(endpoint: &str) -> std::result::Result<String, String> {
    let (host, port) = endpoint
        .rsplit_once(':')
        .ok_or_else(|| format!("the endpoint {endpoint:?} is not HOST:PORT"))?;
    if host.is_empty() || host.contains('/') {
        return Err(format!("the endpoint {endpoint:?} has no host"));
    }
    port.parse::<u16>()
        .map_err(|_| format!("the endpoint {endpoint:?} has no port number"))?;
    Ok(endpoint.to_string())
}

impl FromStr for ClusterUrl {
    type Err = Error;

    fn from_str(url: &str) -> Result<Self> {
        let bad = |reason: &str| Error::BadClusterUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let rest = url
            .strip_prefix("etcd://")
            .ok_or_else(|| bad("it does not start with etcd://"))?;
        let (endpoints, job) = rest
            .split_once('/')
            .ok_or_else(|| bad("it names no job after the endpoints"))?;
        Self::new(endpoints, job).map_err(|e| match e {
            Error::BadClusterUrl { reason, .. } => bad(&reason),
            e => e,
        })
    }
}

impl fmt::Display for ClusterUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "etcd://{}/{}", self.endpoints.join(","), self.job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_names_its_endpoints_and_its_job() {
        let url: ClusterUrl = "etcd://10.0.0.1:2379,etcd-b:2380/lab.run_1"
            .parse()
            .unwrap();
        assert_eq!(url.endpoints, ["10.0.0.1:2379", "etcd-b:2380"]);
        assert_eq!(url.job, "lab.run_1");
        assert_eq!(
            url.to_string(),
            "etcd://10.0.0.1:2379,etcd-b:2380/lab.run_1"
        );
        assert_eq!(url.endpoint_urls()[1], "http://etcd-b:2380");
    }

    #[test]
    fn a_malformed_url_says_what_is_wrong() {
        for (url, says) in [
            ("http://a:1/job", "etcd://"),
            ("etcd://a:1", "no job"),
            ("etcd://a:1/", "empty"),
            ("etcd://a/job", "HOST:PORT"),
            ("etcd://a:x/job", "port number"),
            ("etcd://:1/job", "no host"),
            ("etcd://a:1/jo/b", "'/'"),
        ] {
            let e = url.parse::<ClusterUrl>().unwrap_err().to_string();
            assert!(e.contains(says) && e.contains(url), "{url}: {e}");
        }
    }
}
