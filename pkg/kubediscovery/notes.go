package kubediscovery

import (
	"context"
	"fmt"
	"log/slog"
)

// notes logs what a rebuild finds wrong with an object once, and again
// only when the finding changes: every rebuild sees every object, and a
// malformed policy must not log on each pod update.
type notes struct {
	log  *slog.Logger
	seen map[string]string // object key -> last message logged
	cur  map[string]string
}

func newNotes(log *slog.Logger) *notes {
	return &notes{log: log, seen: map[string]string{}}
}

// begin starts a rebuild.
func (n *notes) begin() { n.cur = map[string]string{} }

// add records a finding about the object called key and logs it unless
// the previous rebuild logged the same one.
func (n *notes) add(level slog.Level, key, msg string, args ...any) {
	text := msg + fmt.Sprint(args...)
	n.cur[key] = text
	if n.seen[key] != text {
		n.log.Log(context.Background(), level, msg, append([]any{"object", key}, args...)...)
	}
}

// end finishes a rebuild: findings about objects that are gone or fixed
// are forgotten, so they log again if they come back.
func (n *notes) end() { n.seen, n.cur = n.cur, nil }
