//! [`VmmCommand`]: the argument vector of a `vmm` under test, built by name instead of by
//! string lists copied from test to test.

use std::path::Path;
use std::time::Duration;

use crate::{bin, run_vmm_env, Run, VmmProcess};

/// A `vmm` command line under construction. Each method appends one flag, in call order;
/// [`VmmCommand::start`] and [`VmmCommand::run`] add `--serial file=...` as the other
/// helpers do.
///
/// ```no_run
/// # use vmm_tests::VmmCommand;
/// let run = VmmCommand::test_guest()
///     .memory("128M")
///     .iommu()
///     .vfio_user("socket=/tmp/dma.sock,iommu=on")
///     .cmdline("tests=map_unmap")
///     .run(std::time::Duration::from_secs(60));
/// ```
#[derive(Clone, Debug, Default)]
pub struct VmmCommand {
    args: Vec<String>,
    env: Vec<(String, String)>,
    wrapper: Vec<String>,
}

impl VmmCommand {
    /// No flags yet (a destination waiting with `--incoming` has no kernel).
    pub fn new() -> Self {
        Self::default()
    }

    /// `--kernel` set to the bare-metal test guest.
    pub fn test_guest() -> Self {
        Self::new().kernel(&bin("test-guest"))
    }

    /// `--kernel PATH`.
    pub fn kernel(self, path: &Path) -> Self {
        self.flag("--kernel", path.display())
    }

    /// `--memory SIZE` (`"256M"`).
    pub fn memory(self, size: &str) -> Self {
        self.flag("--memory", size)
    }

    /// `--cmdline TEXT`.
    pub fn cmdline(self, text: &str) -> Self {
        self.flag("--cmdline", text)
    }

    /// `--iommu`.
    pub fn iommu(self) -> Self {
        self.arg("--iommu")
    }

    /// `--counters`.
    pub fn counters(self) -> Self {
        self.arg("--counters")
    }

    /// `--vfio-user VALUE` (a whole value: `socket=PATH[,iommu=on][,dma=...]`).
    pub fn vfio_user(self, value: &str) -> Self {
        self.flag("--vfio-user", value)
    }

    /// `--vhost-user-net VALUE`.
    pub fn vhost_user_net(self, value: &str) -> Self {
        self.flag("--vhost-user-net", value)
    }

    /// `--api-socket PATH`.
    pub fn api_socket(self, path: &Path) -> Self {
        self.flag("--api-socket", path.display())
    }

    /// `--incoming ADDRESS` (`unix:PATH`, `tcp:HOST:PORT,tls=DIR`, `tcp:HOST:PORT,insecure` or
    /// `defer`).
    pub fn incoming(self, address: &str) -> Self {
        self.flag("--incoming", address)
    }

    /// `--incoming unix:PATH`.
    pub fn incoming_unix(self, path: &Path) -> Self {
        self.flag("--incoming", format!("unix:{}", path.display()))
    }

    /// `NAME VALUE`, for flags without a method of their own.
    pub fn flag(self, name: &str, value: impl std::fmt::Display) -> Self {
        self.arg(name).arg(&value.to_string())
    }

    /// One bare argument.
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_string());
        self
    }

    /// Bare arguments, in order.
    pub fn args<S: AsRef<str>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_string()));
        self
    }

    /// An environment variable for the process (a test hook).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Environment variables, in order.
    pub fn envs(self, vars: &[(&str, &str)]) -> Self {
        vars.iter().fold(self, |c, (k, v)| c.env(k, v))
    }

    /// Runs the VMM under `wrapper`, a command that runs the rest of its arguments (`["ip",
    /// "netns", "exec", NAME]`). Only [`VmmCommand::start`] honours it.
    pub fn wrapped(mut self, wrapper: &[&str]) -> Self {
        self.wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        self
    }

    /// The arguments so far (without `--serial`).
    pub fn to_args(&self) -> Vec<String> {
        self.args.clone()
    }

    /// Starts the VMM in the background.
    pub fn start(&self) -> VmmProcess {
        let (args, env) = self.borrowed();
        let wrapper: Vec<&str> = self.wrapper.iter().map(String::as_str).collect();
        VmmProcess::start_wrapped(&wrapper, &args, &env)
    }

    /// Runs the VMM to its end, killing it after `deadline`.
    pub fn run(&self, deadline: Duration) -> Run {
        let (args, env) = self.borrowed();
        run_vmm_env(&args, &env, deadline)
    }

    fn borrowed(&self) -> (Vec<&str>, Vec<(&str, &str)>) {
        (
            self.args.iter().map(String::as_str).collect(),
            self.env
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_come_out_in_call_order_with_their_values() {
        let c = VmmCommand::new()
            .memory("256M")
            .iommu()
            .vfio_user("socket=/s,iommu=on")
            .incoming_unix(Path::new("/m.sock"))
            .flag("--max-rounds", 3)
            .args(["--x", "y"]);
        assert_eq!(
            c.to_args(),
            [
                "--memory",
                "256M",
                "--iommu",
                "--vfio-user",
                "socket=/s,iommu=on",
                "--incoming",
                "unix:/m.sock",
                "--max-rounds",
                "3",
                "--x",
                "y"
            ]
        );
        let g = VmmCommand::test_guest().counters();
        assert_eq!(g.to_args()[0], "--kernel");
        assert!(g.to_args()[1].ends_with("test-guest"));
        assert_eq!(g.to_args()[2], "--counters");
    }
}
