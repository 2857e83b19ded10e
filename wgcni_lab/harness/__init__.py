"""The test harness that the suites (tests/) and the benchmarks (bench/) share: network namespaces and the hook's
namespace lab, the scaled wait, short temporary directories, a fake hook for the plugin and a manual peer source."""
