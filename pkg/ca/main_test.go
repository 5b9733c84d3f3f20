//go:build linux

package ca_test

import (
	"os"
	"testing"

	"github.com/ambpf/ambpf/pkg/ca/catest"
	"github.com/ambpf/ambpf/pkg/kubetest"
)

func TestMain(m *testing.M) {
	code := kubetest.RunShared(m)
	catest.Cleanup()
	os.Exit(code)
}
