//go:build linux

package agent

import (
	"runtime"
	"sync"
	"testing"
)

// TestPodLocks: holders of one UID exclude each other, other UIDs do not
// wait, and no entry outlives its last holder.
func TestPodLocks(t *testing.T) {
	var p podLocks
	unlockA := p.lock("a")
	// Another UID is free while a is held (this would deadlock if not).
	p.lock("b")()

	var inside, maxInside int
	var mu sync.Mutex
	var wg sync.WaitGroup
	unlockA()
	for range 50 {
		wg.Go(func() {
			defer p.lock("a")()
			mu.Lock()
			inside++
			maxInside = max(maxInside, inside)
			mu.Unlock()
			// Give another goroutine the chance to enter meanwhile,
			// which it could only if the pod's lock did not hold.
			runtime.Gosched()
			mu.Lock()
			inside--
			mu.Unlock()
		})
	}
	wg.Wait()
	if maxInside != 1 {
		t.Errorf("%d holders of one pod's lock at once, want 1", maxInside)
	}
	if len(p.m) != 0 {
		t.Errorf("%d lock entries left after every holder unlocked", len(p.m))
	}
}
