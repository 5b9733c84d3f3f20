// Package envflag lets every flag of a command be set from the environment,
// so a pod spec (the Helm chart) configures a binary with env: entries as
// well as with args:, through one parser.
//
// A Binding gives each flag --foo-bar of a flag.FlagSet the variable
// <Prefix>FOO_BAR (upper case, '-' as '_'). Parse applies the environment
// first and the command line after it, so a flag on the command line wins.
//
// Misspelt settings must not be ignored: a variable that starts with the
// prefix but names no flag is an error that names the variable, and the
// command refuses to start. Variables of other programs that share the
// prefix (ambpf-agent's AMBPF_ holds ambpf-proxy's AMBPF_PROXY_) are listed
// in Binding.Ignore.
package envflag

import (
	"errors"
	"flag"
	"fmt"
	"slices"
	"strings"
)

// Binding binds one command's flags to environment variables.
type Binding struct {
	// Prefix starts the variable of every flag, e.g. "AMBPF_PROXY_".
	// Required.
	Prefix string
	// Aliases are further variables of a flag, kept for compatibility:
	// variable name → flag name. An alias may lie outside Prefix
	// (KUBECONFIG). When both an alias and the flag's own variable are
	// set, the flag's own variable wins.
	Aliases map[string]string
	// Ignore lists variables that start with Prefix but belong to another
	// program, so they are not errors: an entry ending in '_' is a prefix
	// ("AMBPF_PROXY_"), any other entry an exact name.
	Ignore []string
}

// Var returns the environment variable of flag name.
func (b Binding) Var(name string) string {
	return b.Prefix + strings.ToUpper(strings.ReplaceAll(name, "-", "_"))
}

// ignored reports whether Ignore covers variable name.
func (b Binding) ignored(name string) bool {
	for _, ig := range b.Ignore {
		if name == ig || strings.HasSuffix(ig, "_") && strings.HasPrefix(name, ig) {
			return true
		}
	}
	return false
}

// Parse sets fs's flags from environ (as os.Environ returns it), then
// parses args, so the command line wins over the environment. It fails,
// naming the variable, when a variable with Prefix names no flag (and is
// neither an alias nor ignored) or holds a value its flag refuses; and
// when args has positional arguments (no ambpf command takes any). With
// fs in flag.ContinueOnError mode, -help returns flag.ErrHelp.
//
// Parse panics when an alias names no flag of fs or when Ignore covers a
// flag's own variable: both are programming errors a test catches.
func (b Binding) Parse(fs *flag.FlagSet, args, environ []string) error {
	byVar := map[string]string{} // variable → flag
	fs.VisitAll(func(f *flag.Flag) {
		v := b.Var(f.Name)
		if b.ignored(v) {
			panic(fmt.Sprintf("envflag: %s of flag -%s is in Ignore", v, f.Name))
		}
		byVar[v] = f.Name
	})
	for v, name := range b.Aliases {
		if fs.Lookup(name) == nil {
			panic(fmt.Sprintf("envflag: alias %s names no flag -%s", v, name))
		}
	}
	env := map[string]string{}
	for _, kv := range environ {
		if k, v, ok := strings.Cut(kv, "="); ok {
			env[k] = v
		}
	}
	var errs []error
	set := func(v, name string) {
		val, ok := env[v]
		if !ok {
			return
		}
		if err := fs.Set(name, val); err != nil {
			errs = append(errs, fmt.Errorf("environment variable %s=%q (flag -%s): %w", v, val, name, err))
		}
	}
	// Aliases first, sorted so that the outcome does not depend on map
	// order; then each flag's own variable, which thus wins.
	aliases := make([]string, 0, len(b.Aliases))
	for v := range b.Aliases {
		aliases = append(aliases, v)
	}
	slices.Sort(aliases)
	for _, v := range aliases {
		set(v, b.Aliases[v])
	}
	names := make([]string, 0, len(env))
	for k := range env {
		names = append(names, k)
	}
	slices.Sort(names)
	for _, v := range names {
		if !strings.HasPrefix(v, b.Prefix) {
			continue
		}
		if name, ok := byVar[v]; ok {
			set(v, name)
			continue
		}
		if _, ok := b.Aliases[v]; ok || b.ignored(v) {
			continue
		}
		errs = append(errs, fmt.Errorf("environment variable %s names no flag of %s (see -help)", v, fs.Name()))
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	return nil
}

// Usage returns a flag.FlagSet Usage function that prints the defaults
// with each flag's variable, so -help documents both ways to set it.
func (b Binding) Usage(fs *flag.FlagSet) func() {
	return func() {
		w := fs.Output()
		fmt.Fprintf(w, "Usage of %s (every flag -foo-bar can also be set as %sFOO_BAR; the command line wins):\n", fs.Name(), b.Prefix)
		fs.VisitAll(func(f *flag.Flag) {
			fmt.Fprintf(w, "  -%s (%s)\n    \t%s", f.Name, b.Var(f.Name), f.Usage)
			if f.DefValue != "" {
				fmt.Fprintf(w, " (default %q)", f.DefValue)
			}
			fmt.Fprintln(w)
		})
		if len(b.Aliases) > 0 {
			aliases := make([]string, 0, len(b.Aliases))
			for v, name := range b.Aliases {
				aliases = append(aliases, v+" = -"+name)
			}
			slices.Sort(aliases)
			fmt.Fprintf(w, "Also read: %s\n", strings.Join(aliases, ", "))
		}
	}
}
