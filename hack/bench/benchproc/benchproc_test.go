//go:build linux

package benchproc

import (
	"os"
	"testing"
)

// TestStatusField reads this process's resident memory and its peak, which
// cannot be below it, and refuses a field /proc/<pid>/status lacks.
func TestStatusField(t *testing.T) {
	rss, err := StatusField(os.Getpid(), "VmRSS")
	if err != nil {
		t.Fatal(err)
	}
	peak, err := StatusField(os.Getpid(), "VmHWM")
	if err != nil {
		t.Fatal(err)
	}
	if rss <= 0 || peak < rss {
		t.Errorf("VmRSS %d, VmHWM %d: want 0 < VmRSS <= VmHWM", rss, peak)
	}
	if _, err := StatusField(os.Getpid(), "NoSuchField"); err == nil {
		t.Error("a missing field gave no error")
	}
}
