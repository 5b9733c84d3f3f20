//go:build linux && ambpf_testhooks

package agent

import (
	"log/slog"
	"os"
	"path/filepath"
	"time"
)

// PauseDirEnv names the directory through which a test pauses an agent
// built with the ambpf_testhooks tag. To stop pod <uid> at <step>, the
// test creates <dir>/<uid>.<step>; the agent, reaching that step, renames
// it to <uid>.<step>.paused and waits until that file is removed (at most
// pauseLimit), then goes on. The name has no AMBPF_ prefix, which the
// agent's flags own.
const PauseDirEnv = "AMBPFTEST_PAUSE_DIR"

const pauseLimit = time.Minute

func init() {
	dir := os.Getenv(PauseDirEnv)
	if dir == "" {
		return
	}
	pause = func(step, uid string) {
		want := filepath.Join(dir, uid+"."+step)
		paused := want + ".paused"
		if err := os.Rename(want, paused); err != nil {
			return // no pause asked for here
		}
		slog.Warn("test hook: enrolment paused", "uid", uid, "step", step)
		deadline := time.Now().Add(pauseLimit)
		for time.Now().Before(deadline) {
			if _, err := os.Stat(paused); err != nil {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
		slog.Warn("test hook: enrolment resumed", "uid", uid, "step", step)
	}
}
