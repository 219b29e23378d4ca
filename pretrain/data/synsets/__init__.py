"""WordNet noun synsets for image-text data: which synsets a caption names (``labels``), how many
records name each (``counting``), the vocabulary of a data set (``vocabulary``), and the WordNet
corpus itself (``wordnet``)."""
