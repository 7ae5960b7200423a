// MathJax configuration for pymdownx.arithmatex (generic mode). MathJax itself is loaded from
// a CDN when a page is viewed (extra_javascript in mkdocs.yml); building needs no network.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};
