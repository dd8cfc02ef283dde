package consentpage

import (
	"errors"
	"fmt"
	"html/template"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// loadTemplates parses the .html files of dir together and returns the
// template of each page: <page>.html, else page.html, else the file of
// the page it falls back to (fallbacks: a set with a file per page made
// before a page existed shows that page with a file it has).
func loadTemplates(dir string) (map[string]*template.Template, error) {
	files, err := filepath.Glob(filepath.Join(dir, "*.html"))
	if err != nil {
		return nil, fmt.Errorf("templates %s: %w", dir, err)
	}
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		return nil, fmt.Errorf("templates %s: not a readable directory (%v)", dir, err)
	}
	known := append(Pages(), "page")
	var errs []error
	for _, f := range files {
		name := strings.TrimSuffix(filepath.Base(f), ".html")
		if !strings.HasPrefix(name, "_") && !slices.Contains(known, name) {
			errs = append(errs, fmt.Errorf("templates %s: %s is not a page: name it page.html (every page), one of %s.html, or start it with _ for shared templates",
				dir, filepath.Base(f), strings.Join(Pages(), ".html, ")))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if len(files) == 0 {
		return nil, fmt.Errorf("templates %s: no .html file: add page.html (used for every page) or one file per page", dir)
	}
	set, err := template.New("").Option("missingkey=error").ParseFiles(files...)
	if err != nil {
		// html/template names the file (its base name) and the line.
		return nil, fmt.Errorf("templates %s: %w", dir, err)
	}
	// fallbacks maps a page to the page whose file shows it in a set
	// with neither its own file nor page.html: pages added after sets
	// with a file per page were made.
	fallbacks := map[string]string{
		PageRetryCallback: PageUnavailable,
		PageCrossSite:     PageUnavailable,
	}
	out := map[string]*template.Template{}
	var missing []string
	for _, p := range Pages() {
		t := set.Lookup(p + ".html")
		if t == nil {
			t = set.Lookup("page.html")
		}
		if t == nil && fallbacks[p] != "" {
			t = set.Lookup(fallbacks[p] + ".html")
		}
		if t == nil {
			missing = append(missing, p+".html")
			continue
		}
		out[p] = t
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("templates %s: no page.html and no %s: add page.html for the pages without a file of their own", dir, strings.Join(missing, ", "))
	}
	return out, nil
}
