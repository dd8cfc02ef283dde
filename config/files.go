package config

import (
	"cmp"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/BurntSushi/toml"

	"github.com/tokenbroker/caddy-token-broker/broker/budget"
	"github.com/tokenbroker/caddy-token-broker/internal/httpclient"
)

// A registry may be split across several files: Files lists them,
// ParseFile parses each one alone (a loader may keep a parsed file while
// its content does not change) and Merge puts them together. Providers
// may be defined in one file and merchants in others; a provider or a
// merchant defined twice is an error naming both places.

// Source is one registry file as read.
type Source struct {
	// Path is the file's path, as named in messages; relative file
	// references in it are resolved against its folder.
	Path string
	// Data is the file's content.
	Data []byte
}

// File is one registry file parsed on its own: its providers decoded, its
// merchants resolved but not yet checked against their providers (Merge).
// It depends only on its path, its content and the environment variables
// its merchants read (Inputs), and is not modified after ParseFile: one
// File may serve several Merges, concurrently too.
type File struct {
	// Path is the file's path.
	Path string

	dir           string // absolute folder of the file
	errs          []error
	merchantsType string // the TOML type of "merchants", "" when absent
	merchantsLine int
	providers     []*rawProvider
	merchants     []Merchant    // sorted by ID
	flags         map[int]uint8 // merchant index -> problems, when any
	wildcard      *Wildcard     // nil without [merchants."*"]
	wildcardFlags uint8
	topDefined    bool // the file defines [merchants] or [providers] itself
	inputs        inputs
}

// Files lists the files of the registry that pattern names: the file
// itself; every *.toml file of a directory, or link to one (names starting
// with "." left out: editors' temporary files); or the files matching a
// glob (filepath.Match syntax), sorted. A file is listed once, however
// many symbolic links to it are found (regularFiles). It fails when that
// is no file.
func Files(pattern string) ([]string, error) {
	if pattern == "" {
		return nil, &Error{Msg: "the registry path is empty: set config to a file, a directory or a glob (a placeholder such as {env.NAME} in it may be unset)"}
	}
	if strings.ContainsAny(pattern, "*?[") {
		matches, err := filepath.Glob(pattern)
		if err != nil {
			return nil, &Error{File: pattern, Msg: fmt.Sprintf("invalid glob: %v", err)}
		}
		files := regularFiles(matches)
		if len(files) == 0 {
			return nil, &Error{File: pattern, Msg: "no registry file matches the glob: check the path"}
		}
		return files, nil
	}
	fi, err := os.Stat(pattern)
	if err != nil {
		return nil, &Error{File: pattern, Msg: fmt.Sprintf("cannot read the registry: %v", err)}
	}
	if !fi.IsDir() {
		return []string{pattern}, nil
	}
	entries, err := os.ReadDir(pattern)
	if err != nil {
		return nil, &Error{File: pattern, Msg: fmt.Sprintf("cannot read the registry directory: %v", err)}
	}
	var names []string
	for _, e := range entries {
		if name := e.Name(); strings.HasSuffix(name, ".toml") && !strings.HasPrefix(name, ".") {
			names = append(names, filepath.Join(pattern, name))
		}
	}
	files := regularFiles(names)
	if len(files) == 0 {
		return nil, &Error{File: pattern, Msg: "the registry directory holds no *.toml file"}
	}
	return files, nil
}

// regularFiles returns, sorted, the paths that are regular files or
// symbolic links to one (a Kubernetes ConfigMap's files are links). A
// file is named once: by its own path when listed, else by its first
// link. Any other path (a link that loops or points nowhere included) is
// left out without a word.
func regularFiles(paths []string) []string {
	type file struct {
		path string
		fi   os.FileInfo
		link bool
	}
	var found []file
	for _, path := range paths {
		fi, err := os.Stat(path)
		if err != nil || !fi.Mode().IsRegular() {
			continue
		}
		lfi, err := os.Lstat(path)
		found = append(found, file{path, fi, err == nil && lfi.Mode()&fs.ModeSymlink != 0})
	}
	// The files first, then the links, each in order of path.
	slices.SortStableFunc(found, func(a, b file) int {
		switch {
		case a.link == b.link:
			return 0
		case b.link:
			return -1
		}
		return 1
	})
	var files []string
	for i, f := range found {
		if f.link && slices.ContainsFunc(found[:i], func(o file) bool { return os.SameFile(o.fi, f.fi) }) {
			continue
		}
		files = append(files, f.path)
	}
	slices.Sort(files)
	return files
}

// ReadSources reads the files of the registry that pattern names (Files).
func ReadSources(pattern string) ([]Source, error) {
	paths, err := Files(pattern)
	if err != nil {
		return nil, err
	}
	srcs := make([]Source, len(paths))
	for i, path := range paths {
		data, err := os.ReadFile(path)
		if err != nil {
			return nil, &Error{File: path, Msg: fmt.Sprintf("cannot read the registry: %v", err)}
		}
		srcs[i] = Source{Path: path, Data: data}
	}
	return srcs, nil
}

// parser resolves the entries of one file, or of a chunk of one, and
// collects their problems.
type parser struct {
	file   string
	dir    string // absolute folder of the file
	opts   Options
	data   []byte // the text parsed, located when a line is needed
	offset int    // the lines of the file before data
	loc    locator
	errs   []error
	inputs inputs // the variables and files read (inputs.go)
	// registry is Registry.Path (Merge's only): part of the providers' IDs
	// and of the refresh store's keys, so that two registries with a
	// provider of the same name keep their tokens apart.
	registry string
}

// ParseFile parses one registry file on its own. lookupEnv resolves the
// {env.NAME} references of merchants (os.LookupEnv when nil). Merge
// reports its problems. A large file is parsed in chunks (parseChunked),
// with the same result.
func ParseFile(src Source, lookupEnv func(string) (string, bool)) *File {
	if lookupEnv == nil {
		lookupEnv = os.LookupEnv
	}
	if f := parseChunked(src, lookupEnv, chunks(len(src.Data))); f != nil {
		return f
	}
	return parseFile(src, lookupEnv, 0, &compactor{})
}

// parseFile parses src, a file or the chunk of one after its first
// offset lines; c compacts its merchants.
func parseFile(src Source, lookupEnv func(string) (string, bool), offset int, c *compactor) *File {
	dir, err := filepath.Abs(filepath.Dir(src.Path))
	if err != nil {
		dir = filepath.Dir(src.Path)
	}
	f := &File{Path: src.Path, dir: dir}
	p := &parser{file: src.Path, dir: dir, opts: Options{LookupEnv: lookupEnv}, data: src.Data, offset: offset}
	defer func() { f.errs, f.inputs = p.errs, p.inputs }()
	var doc document
	md, err := toml.Decode(string(src.Data), &doc)
	if err != nil {
		p.decodeError(err, true)
		f.merchantsType = "error"
		return f
	}
	keys := md.Keys()
	p.checkKeys(keys, func(name string) string {
		var t struct {
			Type string `toml:"type"`
		}
		if prim, ok := doc.Providers[name]; ok {
			_ = md.PrimitiveDecode(prim, &t) // a bad type is reported with the provider
		}
		return t.Type
	})
	f.topDefined = slices.ContainsFunc(keys, func(k toml.Key) bool { return len(k) == 1 })
	for _, k := range topKeys {
		if t := typeOf(&md, k); t != "" && t != "Hash" {
			p.problem([]string{k}, fmt.Sprintf("must be a table of [%s.NAME] tables, not %s", k, typeName(t)))
		}
	}
	f.merchantsType = typeOf(&md, "merchants")
	if f.merchantsType != "" {
		f.merchantsLine = p.line("merchants")
	}
	for _, name := range slices.Sorted(maps.Keys(doc.Providers)) {
		f.providers = append(f.providers, p.rawProvider(&md, name, doc.Providers[name]))
	}
	ids := slices.Sorted(maps.Keys(doc.Merchants))
	f.merchants = make([]Merchant, 0, len(ids))
	for _, id := range ids {
		if id == WildcardID {
			f.wildcard, f.wildcardFlags = p.wildcard(&md, doc.Merchants[id])
			continue
		}
		raw := &merchantTOML{}
		_, m, flags := p.merchant(&md, id, doc.Merchants[id], raw, raw)
		if flags != 0 {
			if f.flags == nil {
				f.flags = map[int]uint8{}
			}
			f.flags[len(f.merchants)] = flags
		}
		f.merchants = append(f.merchants, m)
	}
	c.compact(f.merchants)
	return f
}

// Merge puts parsed files together into a registry and resolves its
// providers. name is the file, directory or glob the files came from
// (Registry.Path); srcs[i] is what files[i] was parsed from (for the
// lines of problems). It reports every problem of every file, by file then
// line.
func Merge(name string, srcs []Source, files []*File, opts Options) (*Registry, error) {
	if len(srcs) != len(files) {
		return nil, fmt.Errorf("config.Merge: %d sources for %d files", len(srcs), len(files))
	}
	if opts.LookupEnv == nil {
		opts.LookupEnv = os.LookupEnv
	}
	ps := make([]*parser, len(files))
	total, merchantsBad := 0, false
	for i, f := range files {
		ps[i] = &parser{file: f.Path, dir: f.dir, opts: opts, data: srcs[i].Data, errs: slices.Clone(f.errs),
			registry: name}
		total += len(f.merchants)
		merchantsBad = merchantsBad || f.merchantsType != "" && f.merchantsType != "Hash"
	}

	dup := func(i int, kind, id string, line int, first at) {
		f := files[first.file].Path
		if first.line > 0 {
			f += fmt.Sprintf(":%d", first.line)
		}
		ps[i].errs = append(ps[i].errs, &Error{File: files[i].Path, Line: line, Entry: fmt.Sprintf("%s %q", kind, id),
			Msg: fmt.Sprintf("also defined at %s: define each %s once", f, kind)})
	}

	reg := &Registry{Path: name, Providers: map[string]*Provider{}, Merchants: make(map[string]*Merchant, total)}
	defined := map[string]string{} // the type of every provider, valid or not
	providerAt := map[string]at{}
	for i, f := range files {
		reg.Files = append(reg.Files, f.Path)
		for _, rp := range f.providers {
			if first, ok := providerAt[rp.name]; ok {
				dup(i, "provider", rp.name, rp.line, first)
				continue
			}
			providerAt[rp.name] = at{i, rp.line}
			defined[rp.name] = rp.typ()
			if pv := ps[i].provider(rp); pv != nil {
				reg.Providers[rp.name] = pv
			}
		}
	}

	var wildcardAt *at
	for i, f := range files {
		p := ps[i]
		if w := f.wildcard; w != nil {
			if wildcardAt != nil {
				dup(i, "merchant", WildcardID, w.Line, *wildcardAt)
			} else {
				wildcardAt = &at{i, w.Line}
				p.checkWildcard(w, f.wildcardFlags, defined, reg.Providers)
				reg.Wildcard = w
			}
		}
		for j := range f.merchants {
			m := &f.merchants[j]
			if _, ok := reg.Merchants[m.ID]; ok {
				dup(i, "merchant", m.ID, m.Line, firstDefinition(files[:i+1], m.ID))
				continue
			}
			reg.Merchants[m.ID] = m
			p.checkMerchant(m, f.flags[j], defined)
		}
	}
	for i, f := range files {
		reg.inputs.add(f.inputs)
		reg.inputs.add(ps[i].inputs)
	}
	if len(reg.Merchants) == 0 && reg.Wildcard == nil && !merchantsBad {
		e := &Error{File: name, Msg: "no merchants: define at least one [merchants.ID] table"}
		if len(files) == 1 {
			e.Line = files[0].merchantsLine
		} else {
			e.Msg = fmt.Sprintf("no merchants in any of its %d files: define at least one [merchants.ID] table", len(files))
		}
		ps[0].errs = append(ps[0].errs, e)
	}

	var errs []error
	for _, p := range ps {
		errs = append(errs, p.sorted()...)
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	var budgetErrs []error
	for _, pv := range reg.Providers {
		if pv.RateLimit == (budget.Limit{}) {
			continue
		}
		if opts.Budgets != nil {
			b, err := opts.Budgets(pv)
			if err != nil {
				at := providerAt[pv.Name]
				budgetErrs = append(budgetErrs, &Error{File: files[at.file].Path, Line: at.line, Entry: fmt.Sprintf("provider %q", pv.Name), Field: "rate_limit", Msg: err.Error()})
				continue
			}
			pv.Budget = b
		} else {
			pv.Budget = budget.New(pv.Name, pv.RateLimit, budget.NewLocal(nil), nil)
		}
		// Before any use of the client: its token answers lower the budget.
		if pv.Budget != nil && pv.client != nil {
			httpclient.ObserveTokenAnswers(pv.client, pv.Budget.Transport)
		}
	}
	if len(budgetErrs) > 0 {
		return nil, errors.Join(budgetErrs...)
	}
	return reg, nil
}

// firstDefinition returns where merchant id is first defined.
func firstDefinition(files []*File, id string) at {
	for i, f := range files {
		if j, ok := slices.BinarySearchFunc(f.merchants, id, func(m Merchant, id string) int { return cmp.Compare(m.ID, id) }); ok {
			return at{i, f.merchants[j].Line}
		}
	}
	return at{}
}

// at is where an entry is defined: a file's index and a line.
type at struct{ file, line int }

// sorted returns the problems by line, those without a line last.
func (p *parser) sorted() []error {
	line := func(err error) int {
		if l := err.(*Error).Line; l > 0 {
			return l
		}
		return math.MaxInt
	}
	slices.SortStableFunc(p.errs, func(a, b error) int { return cmp.Compare(line(a), line(b)) })
	return p.errs
}
