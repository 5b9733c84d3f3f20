//go:build linux

package agent

// pause is called at named steps of an enrolment with the step and the
// pod's UID: "attach" (the netns checked and open, nothing attached yet)
// and "handoff" (attached and recorded, the ZDS Add not sent). In the
// agent as built it does nothing. A binary built with the
// ambpf_testhooks tag (testhook_on.go) can be told to block there, so
// that a test changes the world at a known point of an enrolment
// instead of racing it.
var pause = func(step, uid string) {}
