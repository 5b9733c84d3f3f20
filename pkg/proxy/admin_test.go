//go:build linux

package proxy

import (
	"log/slog"
	"testing"
)

// TestAdminLevels: /logging takes ztunnel's level names (trace is the
// proxy's debug, off silences everything) and reports them back.
func TestAdminLevels(t *testing.T) {
	for in, want := range map[string]string{"trace": "debug", "DEBUG": "debug", "info": "info", "warn": "warn", "error": "error", "off": "off"} {
		l, ok := parseAdminLevel(in)
		if !ok || adminLevelName(l) != want {
			t.Errorf("level %q: %v %v, reported %q, want %q", in, l, ok, adminLevelName(l), want)
		}
	}
	if l, _ := parseAdminLevel("off"); l <= slog.LevelError {
		t.Errorf("off = %v, not above error", l)
	}
	for _, bad := range []string{"verbose", "access=debug", ""} {
		if _, ok := parseAdminLevel(bad); ok {
			t.Errorf("level %q accepted", bad)
		}
	}
}
