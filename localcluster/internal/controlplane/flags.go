package controlplane

import (
	"fmt"
	"sort"

	"github.com/spf13/pflag"
	cliflag "k8s.io/component-base/cli/flag"
)

// applyFlags sets component options through the component's own flag set, so
// every setting below reads exactly like the upstream binary's command line.
func applyFlags(component string, nfs cliflag.NamedFlagSets, values map[string]string) error {
	fs := pflag.NewFlagSet(component, pflag.ContinueOnError)
	for _, name := range nfs.Order {
		fs.AddFlagSet(nfs.FlagSets[name])
	}
	names := make([]string, 0, len(values))
	for k := range values {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		if err := fs.Set(k, values[k]); err != nil {
			return fmt.Errorf("%s --%s=%s: %w", component, k, values[k], err)
		}
	}
	return nil
}
