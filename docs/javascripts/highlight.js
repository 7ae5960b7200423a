// Highlights the code blocks (pymdownx.highlight leaves them to the browser, use_pygments: false)
// with the highlight.js bundled in vendor/highlight.js/, which mkdocs.yml loads before this file.
hljs.highlightAll();
