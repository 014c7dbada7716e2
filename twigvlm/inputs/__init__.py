"""What a generation starts from: images, video, hub ids, named models and the paths users give."""
