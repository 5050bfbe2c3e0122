//! Support for Steer's privileged tests: packet tests through `BPF_PROG_TEST_RUN` and
//! integration tests on veth + network-namespace topologies.

pub mod admin;
pub mod bench;
pub mod blocking;
pub mod cpucap;
pub mod etcd;
pub mod flood;
pub mod lab;
pub mod llama;
pub mod metrics;
pub mod netns;
pub mod packet;
pub mod testrun;
pub mod topology;
