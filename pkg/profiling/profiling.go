// Package profiling lets a benchmark profile an installed binary without
// a debug listener: with AMBPF_DEBUG_PROFILE=<dir> in its environment the
// process writes a CPU profile (<dir>/cpu-<pid>.pprof) and a runtime
// execution trace (<dir>/trace-<pid>.out, for scheduler latency) from
// start until Stop. The variable is outside the AMBPF_PROXY_ flag
// namespace on purpose: it is a measuring aid, never configuration.
package profiling

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime/pprof"
	"runtime/trace"
)

// EnvVar names the directory profiles are written to.
const EnvVar = "AMBPF_DEBUG_PROFILE"

// Start begins profiling when EnvVar is set and returns the function that
// ends it and closes the files; without EnvVar it does nothing.
func Start() (stop func(), err error) {
	dir := os.Getenv(EnvVar)
	if dir == "" {
		return func() {}, nil
	}
	pid := os.Getpid()
	cpu, err := os.Create(filepath.Join(dir, fmt.Sprintf("cpu-%d.pprof", pid)))
	if err != nil {
		return nil, fmt.Errorf("profiling: %w", err)
	}
	tr, err := os.Create(filepath.Join(dir, fmt.Sprintf("trace-%d.out", pid)))
	if err != nil {
		cpu.Close()
		return nil, fmt.Errorf("profiling: %w", err)
	}
	if err := pprof.StartCPUProfile(cpu); err != nil {
		cpu.Close()
		tr.Close()
		return nil, fmt.Errorf("profiling: cpu: %w", err)
	}
	if err := trace.Start(tr); err != nil {
		pprof.StopCPUProfile()
		cpu.Close()
		tr.Close()
		return nil, fmt.Errorf("profiling: trace: %w", err)
	}
	return func() {
		trace.Stop()
		pprof.StopCPUProfile()
		tr.Close()
		cpu.Close()
	}, nil
}
