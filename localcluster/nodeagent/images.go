package nodeagent

import (
	"fmt"
	"os"
	"os/user"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// ImageMap says which local program stands in for a container image.
type ImageMap struct {
	Images []ImageEntry `json:"images"`
}

// ImageEntry is one image of the map; see localcluster/images.yaml for the fields' meaning.
type ImageEntry struct {
	Match      string            `json:"match"`
	Entrypoint []string          `json:"entrypoint"`
	Cmd        []string          `json:"cmd,omitempty"`
	Env        map[string]string `json:"env,omitempty"`
	User       *ImageUser        `json:"user,omitempty"`
}

// ImageUser maps the image's own user to a local account.
type ImageUser struct {
	Name     string `json:"name"`
	ImageUID int64  `json:"imageUID"`
	ImageGID int64  `json:"imageGID"`
}

// LoadImageMap reads the map and expands ${VAR} from the environment in entrypoints, cmds and env.
func LoadImageMap(path string, getenv func(string) string) (*ImageMap, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading image map: %w", err)
	}
	return parseImageMap(raw, getenv)
}

func parseImageMap(raw []byte, getenv func(string) string) (*ImageMap, error) {
	var m ImageMap
	if err := yaml.UnmarshalStrict(raw, &m); err != nil {
		return nil, fmt.Errorf("parsing image map: %w", err)
	}
	for i := range m.Images {
		e := &m.Images[i]
		if e.Match == "" || len(e.Entrypoint) == 0 {
			return nil, fmt.Errorf("image map entry %d: match and entrypoint are required", i)
		}
		for j := range e.Entrypoint {
			e.Entrypoint[j] = os.Expand(e.Entrypoint[j], getenv)
		}
		for j := range e.Cmd {
			e.Cmd[j] = os.Expand(e.Cmd[j], getenv)
		}
		for k, v := range e.Env {
			e.Env[k] = os.Expand(v, getenv)
		}
	}
	return &m, nil
}

// imageRepository strips the registry host, the tag/digest and docker.io's "library/".
func imageRepository(image string) string {
	if i := strings.Index(image, "@"); i >= 0 {
		image = image[:i]
	}
	if i := strings.LastIndex(image, ":"); i > strings.LastIndex(image, "/") {
		image = image[:i]
	}
	parts := strings.Split(image, "/")
	if len(parts) > 1 && (strings.ContainsAny(parts[0], ".:") || parts[0] == "localhost") {
		parts = parts[1:]
	}
	if len(parts) > 1 && parts[0] == "library" {
		parts = parts[1:]
	}
	return strings.Join(parts, "/")
}

// Lookup finds the entry of an image: exact repository first, then its last path component.
func (m *ImageMap) Lookup(image string) (*ImageEntry, error) {
	repo := imageRepository(image)
	last := repo[strings.LastIndex(repo, "/")+1:]
	for i := range m.Images {
		if m.Images[i].Match == repo {
			return &m.Images[i], nil
		}
	}
	for i := range m.Images {
		if m.Images[i].Match == last {
			return &m.Images[i], nil
		}
	}
	return nil, fmt.Errorf("image %q (repository %q) has no local program in the image map", image, repo)
}

// commandLine applies Kubernetes' rule: command replaces the entrypoint (and drops the image's
// cmd), args replace the image's cmd.
func commandLine(e *ImageEntry, c *corev1.Container) []string {
	if len(c.Command) > 0 {
		return append(append([]string{}, c.Command...), c.Args...)
	}
	argv := append([]string{}, e.Entrypoint...)
	if len(c.Args) > 0 {
		return append(argv, c.Args...)
	}
	return append(argv, e.Cmd...)
}

// identity is the resolved user of a container process.
type identity struct {
	UID, GID int64
	Groups   []int64
}

// lookupAccount resolves a local account name to uid/gid.
func lookupAccount(name string) (int64, int64, error) {
	u, err := user.Lookup(name)
	if err != nil {
		return 0, 0, fmt.Errorf("local account %q for the image's user: %w", name, err)
	}
	uid, err := strconv.ParseInt(u.Uid, 10, 64)
	if err != nil {
		return 0, 0, fmt.Errorf("uid of %q: %w", name, err)
	}
	gid, err := strconv.ParseInt(u.Gid, 10, 64)
	if err != nil {
		return 0, 0, fmt.Errorf("gid of %q: %w", name, err)
	}
	return uid, gid, nil
}

// idMapper maps the pod's numeric ids to local ones for one image.
type idMapper struct {
	imageUID, imageGID, localUID, localGID int64
	active                                 bool
}

func newIDMapper(e *ImageEntry, lookup func(string) (int64, int64, error)) (idMapper, error) {
	if e == nil || e.User == nil {
		return idMapper{}, nil
	}
	uid, gid, err := lookup(e.User.Name)
	if err != nil {
		return idMapper{}, err
	}
	return idMapper{imageUID: e.User.ImageUID, imageGID: e.User.ImageGID, localUID: uid, localGID: gid, active: true}, nil
}

func (m idMapper) uid(v int64) int64 {
	if m.active && v == m.imageUID {
		return m.localUID
	}
	return v
}

func (m idMapper) gid(v int64) int64 {
	if m.active && v == m.imageGID {
		return m.localGID
	}
	return v
}

// containerIdentity resolves runAsUser/runAsGroup (container over pod), supplemental groups and
// fsGroup, as the runtime would: no runAsUser means the image's user (the mapped local account,
// or root for images without one).
func containerIdentity(pod *corev1.Pod, c *corev1.Container, m idMapper) identity {
	id := identity{}
	if m.active {
		id.UID, id.GID = m.localUID, m.localGID
	}
	psc := pod.Spec.SecurityContext
	csc := c.SecurityContext
	if psc != nil && psc.RunAsUser != nil {
		id.UID = m.uid(*psc.RunAsUser)
	}
	if csc != nil && csc.RunAsUser != nil {
		id.UID = m.uid(*csc.RunAsUser)
	}
	if psc != nil && psc.RunAsGroup != nil {
		id.GID = m.gid(*psc.RunAsGroup)
	}
	if csc != nil && csc.RunAsGroup != nil {
		id.GID = m.gid(*csc.RunAsGroup)
	}
	if psc != nil {
		if psc.FSGroup != nil {
			id.Groups = append(id.Groups, m.gid(*psc.FSGroup))
		}
		for _, g := range psc.SupplementalGroups {
			id.Groups = append(id.Groups, m.gid(g))
		}
	}
	return id
}
