package nodeagent

import (
	"os"
	"path/filepath"

	"warren.dev/localcluster/internal/containerinit"
)

// A container process is started by the container init (package containerinit): the small
// helper binary built next to this one when there is one, else this binary re-executed under
// containerinit.Argv0, which runs it from the init function below (the Go tests of this
// package start containers that way, with the test binary).
type (
	launchSpec = containerinit.Spec
	bindMount  = containerinit.BindMount
)

func init() {
	if len(os.Args) > 0 && os.Args[0] == containerinit.Argv0 {
		containerinit.Main()
	}
}

// containerInitProgram is the program startProcess runs for a container: the helper
// (cmd/localcluster-container-init, which make local-go-build puts beside localcluster) when it is
// next to self, else self. The helper starts in a few milliseconds; self first runs the init
// functions of every Kubernetes package it links (150-350 ms per container start measured on
// this 2-core machine), which every new pod of a scale-up waited for.
func containerInitProgram(self string) string {
	helper := filepath.Join(filepath.Dir(self), containerinit.Argv0)
	if st, err := os.Stat(helper); err == nil && st.Mode().IsRegular() && st.Mode().Perm()&0o111 != 0 {
		return helper
	}
	return self
}
